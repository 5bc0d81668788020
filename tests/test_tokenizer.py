"""Tests of the SentencePiece-based ChatGLM2/ChatGLM3 tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from glm_engine.text.tokenizer import (
    CHATGLM2_SPECIAL_TOKENS,
    CHATGLM3_ROLE_TOKENS,
    TOKENIZER_FILES,
    ChatGLMTokenizer,
    TokenizerError,
    train_sentencepiece,
)

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "cnn_dailymail_sample.jsonl"
TINY_MODEL_VOCAB = 1024  # padded_vocab_size of the tiny test model

ROUND_TRIP_TEXTS = [
    "The council approved the plan on Monday night.",
    "Shares fell 11% to $41.37, the lowest level in 3 years!",
    "续写：北京市教育资源丰富",
    "北京是中国的首都。Beijing is the capital.",
    # Characters the tiny model never saw go through byte fallback.
    "Zürich, 東京 and émigré: ∑ ≠ 🙂",
    "line one\nline two\ttabbed  double  spaced",
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_dir(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def sp(tiny_tokenizer_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def chatglm3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [json.loads(line)["article"] for line in DATA_FILE.read_text(encoding="utf-8").splitlines()[:8]]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("chatglm3_tok"), vocab_size=600, flavor="chatglm3")


def test_special_ids_follow_sentencepiece_vocabulary(tok: ChatGLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    size = sp.get_piece_size()
    assert tok.flavor == "chatglm2"
    assert tok.special_token_ids == {name: size + i for i, name in enumerate(CHATGLM2_SPECIAL_TOKENS)}
    assert list(tok.special_token_ids) == ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
    assert tok.vocab_size == size + 5 == len(tok)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tok.vocab_size <= TINY_MODEL_VOCAB


def test_encode_prepends_gmask_sop(tok: ChatGLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    text = "The wall will run roughly 900 feet."
    ids = tok.encode(text)
    assert ids[:2] == [tok.special_token_ids["[gMASK]"], tok.special_token_ids["sop"]]
    assert ids[2:] == tok.encode(text, add_prefix=False) == sp.encode(text)
    assert tok.encode("", add_prefix=True) == ids[:2]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_inverts_encode(tok: ChatGLMTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_prefix=False)) == text


def test_trained_vocabulary_covers_chinese(tok: ChatGLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    # Characters from the training texts are real pieces, not byte fallback.
    for ch in "北京教育":
        ids = tok.encode(ch, add_prefix=False)
        assert not any(sp.is_byte(i) for i in ids), (ch, [sp.id_to_piece(i) for i in ids])


def test_decode_drops_special_bos_eos_and_pad(tok: ChatGLMTokenizer) -> None:
    body = tok.encode("Police recovered the stamps.", add_prefix=False)
    s = tok.special_token_ids
    noisy = [s["[gMASK]"], s["sop"], tok.bos_token_id, *body, s["[MASK]"], s["eop"], s["[sMASK]"],
             tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]
    assert tok.decode(noisy) == "Police recovered the stamps."
    assert tok.decode([tok.eos_token_id, *s.values()]) == ""


def test_out_of_range_ids_render_unknown_mark(tok: ChatGLMTokenizer) -> None:
    head = tok.encode("Rain", add_prefix=False)
    tail = tok.encode(" fell", add_prefix=False)
    text = tok.decode([*head, tok.vocab_size, *tail])
    assert text.startswith("Rain") and text.endswith("fell")
    assert text.count("\u2047") == 1
    assert tok.decode([TINY_MODEL_VOCAB - 1]).strip() == "\u2047"
    assert tok.decode([-1]).strip() == "\u2047"
    assert tok.decode([10**9, 10**9]).count("\u2047") == 2


def test_decode_accepts_any_int_iterable(tok: ChatGLMTokenizer) -> None:
    import torch

    ids = tok.encode("Chess players")
    assert tok.decode(torch.tensor(ids)) == tok.decode(iter(ids)) == "Chess players"


def test_chat_prompt_is_chatglm2_format(tok: ChatGLMTokenizer) -> None:
    assert tok.chat_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："
    assert ChatGLMTokenizer.chat_prompt("x") == "[Round 1]\n\n问：x\n\n答："


def test_chatglm3_detected_with_role_tokens(chatglm3_dir: Path) -> None:
    tok = ChatGLMTokenizer.from_dir(chatglm3_dir)
    size = tok.sp_model.get_piece_size()
    assert tok.flavor == "chatglm3"
    assert json.loads((chatglm3_dir / "tokenizer_config.json").read_text())["name_or_path"] == "chatglm3-tiny"
    names = CHATGLM2_SPECIAL_TOKENS + CHATGLM3_ROLE_TOKENS
    assert tok.special_token_ids == {name: size + i for i, name in enumerate(names)}
    assert tok.special_token_ids["<|user|>"] == size + 6
    assert tok.vocab_size == size + 9
    s = tok.special_token_ids
    ids = [s["<|system|>"], s["<|user|>"], *tok.encode("Hi", add_prefix=False), s["<|assistant|>"], s["<|observation|>"]]
    assert tok.decode(ids) == "Hi"


def test_flavor_can_be_forced(chatglm3_dir: Path, tiny_tokenizer_dir: Path) -> None:
    assert ChatGLMTokenizer.from_dir(chatglm3_dir, flavor="chatglm2").vocab_size == (
        ChatGLMTokenizer.from_dir(chatglm3_dir).vocab_size - 4
    )
    forced = ChatGLMTokenizer.from_dir(tiny_tokenizer_dir, flavor="chatglm3")
    assert forced.flavor == "chatglm3" and "<|observation|>" in forced.special_token_ids
    with pytest.raises(TokenizerError, match="flavor"):
        ChatGLMTokenizer.from_dir(tiny_tokenizer_dir, flavor="glm4")


@pytest.mark.parametrize(
    ("config", "flavor"),
    [
        ({"_name_or_path": "THUDM/ChatGLM3-6B", "tokenizer_class": "ChatGLMTokenizer"}, "chatglm3"),
        ({"name_or_path": "/models/chatglm3-6b-32k"}, "chatglm3"),
        ({"added_tokens_decoder": {"64796": {"content": "<|user|>"}}}, "chatglm3"),
        ({"name_or_path": "THUDM/chatglm2-6b", "remove_space": False}, "chatglm2"),
        ({}, "chatglm2"),
        (None, "chatglm2"),
    ],
)
def test_flavor_detection_from_tokenizer_config(
    tmp_path: Path, tiny_tokenizer_dir: Path, config: dict | None, flavor: str
) -> None:
    shutil.copyfile(tiny_tokenizer_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatGLMTokenizer.from_dir(tmp_path).flavor == flavor


def test_missing_directory_or_model_file(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    with pytest.raises(TokenizerError) as err:
        ChatGLMTokenizer.from_dir(missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)

    with pytest.raises(TokenizerError) as err:
        ChatGLMTokenizer.from_dir(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "tokenizer.model" in message and "\n" not in message


def test_corrupt_model_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="SentencePiece"):
        ChatGLMTokenizer.from_dir(tmp_path)


def test_training_is_deterministic_and_tidy(tmp_path: Path) -> None:
    texts = [json.loads(line)["article"] for line in DATA_FILE.read_text(encoding="utf-8").splitlines()]
    first = train_sentencepiece(texts, tmp_path / "a", vocab_size=800)
    second = train_sentencepiece(texts, tmp_path / "b", vocab_size=800)
    assert (first / "tokenizer.model").read_bytes() == (second / "tokenizer.model").read_bytes()
    assert sorted(p.name for p in first.iterdir()) == ["tokenizer.model"]
    assert ChatGLMTokenizer.from_dir(first).sp_model.get_piece_size() <= 800


def test_training_rejects_empty_input(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError):
        train_sentencepiece(["", "  \n"], tmp_path)


def test_tokenizer_files_never_include_code() -> None:
    assert set(TOKENIZER_FILES) == {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}
    assert not any(name.endswith(".py") for name in TOKENIZER_FILES)


def test_decode_within_text_keeps_the_leading_space(tok: ChatGLMTokenizer) -> None:
    ids = tok.encode("fell", add_prefix=False)  # "▁fell": SentencePiece marks the start of a text as a space
    assert tok.decode(ids) == "fell"  # and drops it at the start of a text
    assert tok.decode(ids, within_text=True) == " fell"
    assert tok.decode([tok.eos_token_id], within_text=True) == ""


def test_unfinished_tail_counts_what_hold_incomplete_leaves_out(tok: ChatGLMTokenizer) -> None:
    byte = lambda value: tok.sp_model.piece_to_id(f"<0x{value:02X}>")  # noqa: E731
    eos, head = tok.eos_token_id, tok.encode("Rain", add_prefix=False)
    bei = [byte(0xE5), byte(0x8C), byte(0x97)]  # 北, byte by byte
    assert tok.unfinished_tail(head + bei) == tok.unfinished_tail(head) == tok.unfinished_tail([]) == 0
    assert tok.unfinished_tail(head + bei[:1]) == 1
    assert tok.unfinished_tail(head + [bei[0], eos, bei[1], eos]) == 4  # silent ids after the first byte count
    assert tok.unfinished_tail([eos, *bei[:2]]) == 2
    assert tok.decode(head + [bei[0], eos, bei[1], eos], hold_incomplete=True) == tok.decode(head)
