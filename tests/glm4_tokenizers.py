"""Write small GLM-4-style tokenizers for tests: one byte-level BPE vocabulary, trained by
the tokenizers library with GLM-4's split pattern, written both as transformers'
tokenizer.json (GLM-4-9B-chat-hf's kind) and as THUDM's tiktoken tokenizer.model
("base64-token rank" lines, ranks = the ids) with tokenizer_config.json's
added_tokens_decoder (GLM-4-9B-chat's kind). The special tokens follow the vocabulary."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from glm_engine.text.bpe_tokenizer import GLM4_PATTERN, GLM4_SPECIAL_TOKENS

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "cnn_dailymail_sample.jsonl"
EXTRA_TEXTS = ["续写：北京市教育资源丰富", "北京是中国的首都。", "你好，我是人工智能助手。"] * 20


def byte_characters() -> dict[int, str]:
    """GPT-2's byte -> printable character map of byte-level vocabularies (independent of the engine's)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    return {byte: chr(byte) if byte in printable else chr(next(extra)) for byte in range(256)}


def train_bpe(vocab_size: int = 700) -> Tokenizer:
    """A byte-level BPE trained on the sample articles, GLM-4's special tokens added after it."""
    articles = [json.loads(line)["article"] for line in DATA_FILE.read_text(encoding="utf-8").splitlines()[:12]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(articles + EXTRA_TEXTS, trainer)
    tokenizer.add_special_tokens(list(GLM4_SPECIAL_TOKENS))
    return tokenizer


def write_glm4_tokenizers(root: Path) -> tuple[Path, Path]:
    """(the tiktoken directory, the tokenizer.json directory) of one trained vocabulary."""
    tokenizer = train_bpe()
    json_dir, tiktoken_dir = root / "hf", root / "thudm"
    json_dir.mkdir(parents=True)
    tiktoken_dir.mkdir(parents=True)
    tokenizer.save(str(json_dir / "tokenizer.json"))
    byte_of = {char: byte for byte, char in byte_characters().items()}
    vocab = sorted(tokenizer.get_vocab(with_added_tokens=False).items(), key=lambda item: item[1])
    lines = [f"{base64.b64encode(bytes(byte_of[c] for c in token)).decode()} {rank}" for token, rank in vocab]
    (tiktoken_dir / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    added = {str(token_id): {"content": token.content, "special": True}
             for token_id, token in tokenizer.get_added_tokens_decoder().items()}
    config = {"added_tokens_decoder": added, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "tokenizer_class": "ChatGLM4Tokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}}
    (tiktoken_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return tiktoken_dir, json_dir
