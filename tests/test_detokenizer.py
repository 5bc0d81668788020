"""IncrementalDetokenizer: the text of tokens given a few at a time adds up to exactly
the tokenizer's decode of all of them, whatever the ids (byte pieces making multi-byte
characters, Chinese text, leading spaces, special ids, ids the tokenizer lacks) and
however they are split, on tokenizers with and without SentencePiece's dummy prefix
and whitespace folding; token ends map characters back to tokens as decoding every
prefix would; and each token is decoded a few times, not the whole text each step."""

from __future__ import annotations

import io
import json
import random

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO_ROOT
from glm_engine.text.detokenizer import IncrementalDetokenizer
from glm_engine.text.tokenizer import ChatGLMTokenizer, train_sentencepiece

DEMO_TOKENIZER = ChatGLMTokenizer.from_dir(REPO_ROOT / "data" / "demo_tokenizer")
TEXTS = ["北京是中国的首都。Beijing is the capital.", "Zürich, 東京 and émigré: ∑ ≠ 🙂", "  two  spaces ",
         "\n\nnew lines\t", "🙂🙂中文 text", "续写：北京市教育资源丰富"]
TOKENIZERS = ["demo", "chatglm3", "no dummy prefix", "folded whitespace",
              "no dummy prefix, folded whitespace"]


def sample_sentences() -> list[str]:
    records = (REPO_ROOT / "data" / "cnn_dailymail_sample.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    articles = [json.loads(record)["article"] for record in records]
    return [line for text in articles + TEXTS for line in text.splitlines() if line.strip()]


def sentencepiece_tokenizer(dummy_prefix: bool, fold_whitespace: bool) -> ChatGLMTokenizer:
    """A small tokenizer trained with SentencePiece's options that change how a text's
    leading spaces decode (train_sentencepiece keeps the defaults)."""
    model = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_sentences()), model_writer=model, model_type="bpe",
                                   vocab_size=400, hard_vocab_limit=False, byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, add_dummy_prefix=dummy_prefix,
                                   remove_extra_whitespaces=fold_whitespace, num_threads=1, minloglevel=2)
    return ChatGLMTokenizer(spm.SentencePieceProcessor(model_proto=model.getvalue()))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ChatGLMTokenizer]:
    chatglm3 = train_sentencepiece(sample_sentences(), tmp_path_factory.mktemp("chatglm3"), vocab_size=500,
                                   flavor="chatglm3")
    return {"demo": DEMO_TOKENIZER, "chatglm3": ChatGLMTokenizer.from_dir(chatglm3),
            "no dummy prefix": sentencepiece_tokenizer(False, False),
            "folded whitespace": sentencepiece_tokenizer(True, True),
            "no dummy prefix, folded whitespace": sentencepiece_tokenizer(False, True)}


def kinds_of_ids(tokenizer: ChatGLMTokenizer) -> tuple[list[int], ...]:
    """Byte pieces, word starts (a leading space), the bare space piece, silent ids, any id."""
    pieces = tokenizer.sp_model
    return ([i for i in range(tokenizer.sp_size) if pieces.is_byte(i)],
            [i for i in range(tokenizer.sp_size) if pieces.id_to_piece(i).startswith("▁")],
            [i for i in range(tokenizer.sp_size) if pieces.id_to_piece(i) == "▁"] or [3],
            sorted(tokenizer.silent_ids), list(range(tokenizer.vocab_size)), [-1, tokenizer.vocab_size])


def random_ids(rng: random.Random, count: int, tokenizer: ChatGLMTokenizer = DEMO_TOKENIZER) -> list[int]:
    """`count` ids, each of a kind of kinds_of_ids chosen at random."""
    kinds = kinds_of_ids(tokenizer)
    return [rng.choice(rng.choice(kinds)) for _ in range(count)]


def token_ids(tokenizer: ChatGLMTokenizer) -> st.SearchStrategy[list[int]]:
    """Runs of ids: single ids of every kind, whole characters as byte pieces, encoded text."""
    byte = {int(tokenizer.sp_model.id_to_piece(i)[3:5], 16): i for i in kinds_of_ids(tokenizer)[0]}
    texts = st.text(st.sampled_from("ab 北京中文\n\t🙂é,?!:") | st.characters(codec="utf-8"), max_size=8)
    runs = st.one_of(st.sampled_from(kinds_of_ids(tokenizer)).flatmap(st.sampled_from).map(lambda i: [i]),
                     st.characters(codec="utf-8").map(lambda c: [byte[b] for b in c.encode()]),
                     (st.sampled_from(TEXTS) | texts).map(lambda text: tokenizer.encode(text, add_prefix=False)))
    return st.lists(runs, min_size=1, max_size=12).map(lambda parts: [i for part in parts for i in part])


def within_by_prefixes(tokenizer: ChatGLMTokenizer, ids: list[int], chars: int) -> int:
    """The most leading tokens whose decoded text is at most `chars` long."""
    count = len(ids)
    while count and len(tokenizer.decode(ids[:count])) > chars:
        count -= 1
    return count


def check_pieces(tokenizer: ChatGLMTokenizer, ids: list[int], steps: list[int]) -> None:
    """Feeds `ids` in steps of the given sizes (cycled) and checks every promise."""
    detokenizer, text, given = IncrementalDetokenizer(tokenizer), "", 0
    for size in steps * len(ids):
        if given == len(ids):
            break
        text += detokenizer.add(ids[given:given + size])
        given = min(len(ids), given + size)
        assert text == tokenizer.decode(ids[:given], hold_incomplete=True)
        assert detokenizer.released == given - tokenizer.unfinished_tail(ids[:given])
    text += detokenizer.finish()
    whole = tokenizer.decode(ids)
    assert text == detokenizer.text == whole and detokenizer.length == len(whole)
    assert len(detokenizer.ends) == len(ids) and detokenizer.ends == sorted(detokenizer.ends)
    for chars in range(len(whole) + 1):
        assert detokenizer.tokens_within(chars) == within_by_prefixes(tokenizer, ids, chars), chars


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_pieces_add_up_to_the_decode_of_all_tokens(tokenizers, name, data):
    tokenizer = tokenizers[name]
    ids = data.draw(token_ids(tokenizer), label="ids")
    steps = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=6), label="steps")
    check_pieces(tokenizer, ids, steps)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_many_random_token_streams(tokenizers, name):
    tokenizer, rng = tokenizers[name], random.Random(TOKENIZERS.index(name))
    for _ in range(100):
        check_pieces(tokenizer, random_ids(rng, rng.randrange(1, 40), tokenizer),
                     [rng.choice([1, 1, 2, 3, 9, 20]) for _ in range(4)])
    for text in TEXTS:
        check_pieces(tokenizer, tokenizer.encode(text), [1])


def test_a_character_split_over_byte_pieces_comes_whole():
    tokenizer = DEMO_TOKENIZER
    byte = lambda value: tokenizer.sp_model.piece_to_id(f"<0x{value:02X}>")  # noqa: E731
    bei = [byte(0xE5), byte(0x8C), byte(0x97)]  # 北, byte by byte
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.add([token]) for token in [byte(0x41), *bei]] == ["A", "", "", "北"]
    assert detokenizer.ends == [1, 2, 2, 2]  # the character is the text of each of its bytes
    assert detokenizer.tokens_within(1) == 1
    unfinished = IncrementalDetokenizer(tokenizer)
    assert unfinished.add(bei[:2] + [tokenizer.eos_token_id]) == "" and unfinished.released == 0
    assert unfinished.finish() == tokenizer.decode(bei[:2]) == "⁇⁇"  # released as decode shows it
    with pytest.raises(ValueError, match="after finish"):
        unfinished.add(bei[2:])


def test_a_leading_space_is_kept_after_the_first_text():
    tokenizer = DEMO_TOKENIZER
    ids = tokenizer.encode("Hello world again", add_prefix=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert "".join(detokenizer.add([token]) for token in ids) == "Hello world again"


class CountingTokenizer:
    """A tokenizer that counts the ids it is given to decode."""

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self.tokenizer, self.silent_ids, self.decoded = tokenizer, tokenizer.silent_ids, 0

    def decode(self, ids, hold_incomplete: bool = False, within_text: bool = False) -> str:
        ids = list(ids)
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, hold_incomplete, within_text)

    def unfinished_tail(self, ids) -> int:
        self.decoded += len(ids)
        return self.tokenizer.unfinished_tail(ids)


@pytest.mark.parametrize("step", [1, 3, 50])
def test_each_token_is_decoded_a_few_times_not_the_whole_text_each_step(step):
    tokenizer = CountingTokenizer(DEMO_TOKENIZER)
    ids = random_ids(random.Random(step), 4000)
    detokenizer = IncrementalDetokenizer(tokenizer)
    text = "".join(detokenizer.add(ids[start:start + step]) for start in range(0, len(ids), step))
    assert text + detokenizer.finish() == DEMO_TOKENIZER.decode(ids)
    assert tokenizer.decoded <= 6 * len(ids)  # the whole text each step: len(ids) ** 2 / (2 * step)
