"""Trains the small tokenizers the demo, the tests and dummy engines use, on the
bundled cnn_dailymail sample and a few Chinese lines. ChatGLM2's kind: a SentencePiece
model of 1000 pieces (byte fallback, so any text encodes) plus ChatGLM2's special
tokens on top, in data/demo_tokenizer/ (`python scripts/make_demo_tokenizer.py
data/demo_tokenizer`); build.py trains a smaller one for a dummy vocabulary it does
not fit. GLM-4's kind: THUDM's tiktoken tokenizer.model of a byte-level BPE of 1000
ranks, GLM-4's special tokens after them, in data/demo_tokenizer_glm4/ (`... --flavor
glm4 data/demo_tokenizer_glm4`), for dummy GLM-4 engines. The real tokenizers come
with a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from glm_engine.text.bpe_tokenizer import GLM4_PATTERN, byte_characters  # noqa: E402
from glm_engine.text.tokenizer import TokenizerError, train_sentencepiece  # noqa: E402

SAMPLE_DATA = REPO_ROOT / "data" / "cnn_dailymail_sample.jsonl"
BUNDLED_DIR = REPO_ROOT / "data" / "demo_tokenizer"
GLM4_BUNDLED_DIR = REPO_ROOT / "data" / "demo_tokenizer_glm4"
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
DEMO_BPE_VOCAB_SIZE = 1000


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


def train_glm4_demo_tokenizer(output_dir: str | Path, vocab_size: int = DEMO_BPE_VOCAB_SIZE) -> Path:
    """Writes GLM-4's kind of demo tokenizer into `output_dir` and returns it: a byte-level
    BPE of `vocab_size` ranks trained by the tokenizers library with GLM-4's split
    pattern, as THUDM's tokenizer.model ("base64 bytes, rank" lines); GLM-4's special
    tokens follow the ranks (no tokenizer_config.json needed)."""
    import base64

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(demo_corpus(), trainer)
    byte_of = {char: byte for byte, char in byte_characters().items()}
    ranks = sorted(tokenizer.get_vocab(with_added_tokens=False).items(), key=lambda item: item[1])
    lines = [f"{base64.b64encode(bytes(byte_of[char] for char in token)).decode()} {rank}" for token, rank in ranks]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    return output_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--flavor", choices=["chatglm2", "chatglm3", "glm4"], default="chatglm2")
    args = parser.parse_args()
    if args.flavor == "glm4":
        print(train_glm4_demo_tokenizer(args.output_dir))
    else:
        print(train_demo_tokenizer(args.output_dir, args.flavor))
