"""GLM-4's byte-level BPE tokenizers against the reference libraries on the same files:
THUDM's tiktoken tokenizer.model (tiktoken's own loader and encoder) and transformers'
tokenizer.json (the tokenizers library); streaming decode; the chat formats against the
models' reference templates; build.py copying a GLM-4 tokenizer into an engine."""

from __future__ import annotations

import jinja2
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer

import build
from glm4_checkpoints import glm_state_dict, tiny_glm_config, write_glm_checkpoint
from glm4_tokenizers import write_glm4_tokenizers
from glm_engine import GlmEngineError
from glm_engine.text.bpe_tokenizer import GLM4_PATTERN, GLM4_SPECIAL_TOKENS, BPETokenizer
from glm_engine.text.detokenizer import IncrementalDetokenizer
from glm_engine.text.errors import TokenizerError
from glm_engine.text.prompts import chat_prompt_ids
from glm_engine.text.tokenizer import ChatGLMTokenizer, load_tokenizer

TEXTS = [
    "The council approved the plan on Monday night.",
    "Shares fell 11% to $41.37, the lowest level in 3 years!",
    "续写：北京市教育资源丰富",
    "Zürich, 東京 and émigré: ∑ ≠ 🙂",
    "line one\n\nline two\ttabbed  double  spaced   ",
    "I'LL say it's 12345678 o'clock\r\n",
    "<|user|>\nhello<|assistant|>",
    "",
]
# GLM-4-9B-chat's chat template (tokenizer_config.json), without its tool branch.
GLM4_TEMPLATE = ("[gMASK]<sop>{% for item in messages %}{% if item['role'] == 'system' %}<|system|>\n"
                 "{{ item['content'] }}{% elif item['role'] == 'user' %}<|user|>\n{{ item['content'] }}"
                 "{% elif item['role'] == 'assistant' %}<|assistant|>\n{{ item['content'] }}"
                 "{% elif item['role'] == 'observation' %}<|observation|>\n{{ item['content'] }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def glm4_dirs(tmp_path_factory):
    """(tiktoken directory, tokenizer.json directory) of one small trained vocabulary."""
    return write_glm4_tokenizers(tmp_path_factory.mktemp("glm4_tokenizers"))


@pytest.fixture(scope="module")
def reference_tiktoken(glm4_dirs) -> tiktoken.Encoding:
    """THUDM's construction: tiktoken's loader, GLM-4's pattern, the specials after the ranks."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", "")  # no copy of the file in tiktoken's cache
        ranks = load_tiktoken_bpe(str(glm4_dirs[0] / "tokenizer.model"))
    specials = {name: len(ranks) + i for i, name in enumerate(GLM4_SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="reference", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_equals_the_reference_libraries(glm4_dirs, reference_tiktoken, text):
    thudm, hf = (load_tokenizer(directory) for directory in glm4_dirs)
    expected = reference_tiktoken.encode(text, allowed_special="all")
    assert thudm.encode(text, add_prefix=False) == expected
    assert hf.encode(text, add_prefix=False) == Tokenizer.from_file(str(glm4_dirs[1] / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids == expected
    prefix = [thudm.special_token_ids["[gMASK]"], thudm.special_token_ids["<sop>"]]
    assert thudm.encode(text) == hf.encode(text) == prefix + expected


@pytest.mark.parametrize("text", TEXTS)
def test_decoding_equals_the_reference_libraries(glm4_dirs, reference_tiktoken, text):
    thudm, hf = (load_tokenizer(directory) for directory in glm4_dirs)
    ids = thudm.encode(text)
    plain = [token for token in ids if token not in thudm.silent_ids]
    assert thudm.decode(ids) == hf.decode(ids) == reference_tiktoken.decode(plain)
    assert hf.decode(ids) == Tokenizer.from_file(str(glm4_dirs[1] / "tokenizer.json")).decode(
        ids, skip_special_tokens=True)


def test_the_two_files_give_the_same_tokenizer(glm4_dirs):
    thudm, hf = (load_tokenizer(directory) for directory in glm4_dirs)
    assert isinstance(thudm, BPETokenizer) and isinstance(hf, BPETokenizer) and thudm.flavor == "glm4"
    assert thudm.special_token_ids == hf.special_token_ids
    assert thudm.vocab_size == hf.vocab_size == len(thudm)
    assert thudm.token_bytes() == hf.token_bytes()
    first = thudm.special_token_ids["<|endoftext|>"]
    assert list(thudm.special_token_ids) == list(GLM4_SPECIAL_TOKENS)
    assert (thudm.eos_token_id, thudm.pad_token_id, thudm.vocab_size) == (first, first, first + 14)
    assert thudm.silent_ids == frozenset(range(first, first + 14))
    assert thudm.token_bytes()[first] == b"\xff<|endoftext|>"
    longest = max(thudm.token_bytes()[:first], key=len)
    assert thudm.max_token_chars() == hf.max_token_chars() == len(longest.decode("utf-8", errors="replace")) > 1


def test_max_token_chars_of_sentencepiece_is_its_longest_text_piece(tiny_tokenizer_dir):
    tokenizer = ChatGLMTokenizer.from_dir(tiny_tokenizer_dir)
    pieces = [tokenizer.sp_model.id_to_piece(i) for i in range(tokenizer.sp_size)]
    assert tokenizer.max_token_chars() == max(len(piece) for piece in pieces if not piece.startswith(("<0x", "<")))


def test_without_tokenizer_config_the_specials_follow_the_ranks(glm4_dirs, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((glm4_dirs[0] / "tokenizer.model").read_bytes())
    assert load_tokenizer(tmp_path).special_token_ids == load_tokenizer(glm4_dirs[0]).special_token_ids


@pytest.mark.parametrize("text", [TEXTS[3], "饕餮 🙂🙃"])
def test_streamed_text_holds_unfinished_characters_and_equals_decode(glm4_dirs, text):
    tokenizer = load_tokenizer(glm4_dirs[0])
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add([token]) for token in ids]
    assert "".join(pieces) + detokenizer.finish() == tokenizer.decode(ids) == text
    assert all("⁇" not in piece for piece in pieces)
    split = next(i for i in range(1, len(ids)) if tokenizer.unfinished_tail(ids[:i]))
    assert tokenizer.decode(ids[:split], hold_incomplete=True) == tokenizer.decode(
        ids[:split - tokenizer.unfinished_tail(ids[:split])])
    assert tokenizer.decode(ids[:split]).endswith("⁇")


def test_ids_outside_the_vocabulary_print_the_unknown_mark(glm4_dirs):
    tokenizer = load_tokenizer(glm4_dirs[1])
    assert tokenizer.decode([tokenizer.vocab_size + 3]) == "⁇"


MESSAGES = [[("user", "hi")], [("system", "be brief"), ("user", "hi"), ("assistant", "hello!"), ("user", "more")],
            [("user", "北京"), ("assistant", "首都"), ("observation", "{\"ok\": 1}"), ("user", "?")]]


@pytest.mark.parametrize("messages", MESSAGES)
def test_glm4_chat_prompt_equals_its_template(glm4_dirs, reference_tiktoken, messages):
    text = jinja2.Template(GLM4_TEMPLATE).render(messages=[{"role": r, "content": c} for r, c in messages],
                                                 add_generation_prompt=True)
    hf = Tokenizer.from_file(str(glm4_dirs[1] / "tokenizer.json"))
    for directory in glm4_dirs:
        ids = chat_prompt_ids(load_tokenizer(directory), messages)
        assert ids == reference_tiktoken.encode(text, allowed_special="all") == hf.encode(
            text, add_special_tokens=False).ids


def chatglm2_build_prompt(query: str, history: list[tuple[str, str]]) -> str:
    """ChatGLM2-6B's tokenizer.build_prompt (the model card's chat), restated."""
    prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


def test_chatglm2_rounds_equal_its_build_prompt(tiny_tokenizer_dir):
    tokenizer = ChatGLMTokenizer.from_dir(tiny_tokenizer_dir)
    history = [("hi", "hello"), ("北京", "首都")]
    messages = [(role, text) for q, r in history for role, text in (("user", q), ("assistant", r))]
    assert chat_prompt_ids(tokenizer, messages + [("user", "more")]) == tokenizer.encode(
        chatglm2_build_prompt("more", history))


def test_an_unknown_role_is_refused(glm4_dirs):
    with pytest.raises(GlmEngineError, match="chat role 'tool' has no role token"):
        chat_prompt_ids(load_tokenizer(glm4_dirs[0]), [("tool", "x"), ("user", "y")])


def test_damaged_files_are_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_text("QUJD 0\nnot-base64! 1\n")
    with pytest.raises(TokenizerError, match="line 2 is not 'base64-token rank'"):
        BPETokenizer.from_tiktoken_file(tmp_path / "tokenizer.model")
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    (json_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="is not a tokenizer.json"):
        load_tokenizer(json_dir)


@pytest.mark.parametrize("kind", [0, 1])
def test_build_copies_a_glm4_tokenizer_into_the_engine(glm4_dirs, tmp_path, kind):
    config = tiny_glm_config("glm4")
    model_dir = write_glm_checkpoint(tmp_path / "model", config, glm_state_dict(config, 0), sharded=False)
    args = build.parse_arguments(["--model_dir", str(model_dir), "--tokenizer_dir", str(glm4_dirs[kind]),
                                  "--output_dir", str(tmp_path / "engine"), "--dtype", "float32",
                                  "--log_level", "error"])
    engine_dir = build.build(args)
    copied = load_tokenizer(engine_dir)
    assert isinstance(copied, BPETokenizer)
    assert copied.encode(TEXTS[2]) == load_tokenizer(glm4_dirs[kind]).encode(TEXTS[2])
