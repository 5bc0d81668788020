"""Trains the small ChatGLM2-format tokenizer the demo, the tests and dummy engines
use: a SentencePiece model of 1000 pieces (byte fallback, so any text encodes) on
the bundled cnn_dailymail sample and a few Chinese lines, plus ChatGLM2's special
tokens on top; data/demo_tokenizer/ holds it, made by
`python scripts/make_demo_tokenizer.py data/demo_tokenizer`. build.py trains a
smaller one for a dummy vocabulary it does not fit. The real ChatGLM2 tokenizer
comes with a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from glm_engine.text.tokenizer import TokenizerError, train_sentencepiece  # noqa: E402

SAMPLE_DATA = REPO_ROOT / "data" / "cnn_dailymail_sample.jsonl"
BUNDLED_DIR = REPO_ROOT / "data" / "demo_tokenizer"
# Chinese text so the tiny vocabulary has Chinese pieces, and ChatGLM2's chat
# prompt so its markers encode compactly.
CHINESE_TEXTS = (
    "续写：北京市教育资源丰富",
    "北京是中国的首都，也是一座历史悠久的城市。",
    "今天天气很好，我们去公园散步吧。",
    "人工智能正在改变我们的生活和工作方式。",
    "[Round 1]\n\n问：你好\n\n答：你好！有什么可以帮你的吗？",
)
DEMO_SP_VOCAB_SIZE = 1000


def demo_corpus() -> list[str]:
    """Articles and highlights of the bundled sample plus the Chinese lines."""
    texts = []
    for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        texts += [record["article"], record["highlights"]]
    return texts + list(CHINESE_TEXTS)


# Smaller vocabularies leave rarer characters to byte fallback (256 byte pieces come first).
CHARACTER_COVERAGES = (1.0, 0.9995, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8)


def train_demo_tokenizer(output_dir: str | Path, flavor: str = "chatglm2",
                         sp_vocab_size: int = DEMO_SP_VOCAB_SIZE) -> Path:
    """Writes the demo tokenizer (`sp_vocab_size` SentencePiece pieces, special tokens
    on top) into `output_dir` and returns it; TokenizerError when no character
    coverage fits the pieces (about 270 at the least)."""
    corpus = demo_corpus()
    for coverage in CHARACTER_COVERAGES:
        try:
            return train_sentencepiece(corpus, output_dir, sp_vocab_size, flavor, character_coverage=coverage)
        except RuntimeError:  # SentencePiece: fewer pieces than the characters it must cover
            continue
    raise TokenizerError(f"no demo tokenizer of {sp_vocab_size} pieces can be trained (too few for the 256 "
                         "byte pieces and the text's characters)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--flavor", choices=["chatglm2", "chatglm3"], default="chatglm2")
    args = parser.parse_args()
    print(train_demo_tokenizer(args.output_dir, args.flavor))
