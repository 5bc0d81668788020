"""Stop strings: generation ends where the generated text first contains one, the
text from it on is not returned (nor its tokens), whether the string lies inside one
token or spans several; tokens that might begin one are held back, not lost."""

from __future__ import annotations

import random

import pytest

from glm_engine import GlmEngineError
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.text.stop_words import StopStrings
from glm_engine.text.tokenizer import ChatGLMTokenizer
from model import load_session
from test_detokenizer import DEMO_TOKENIZER, CountingTokenizer, random_ids
from test_model import build_engine, random_prompt


@pytest.fixture(scope="module")
def session(tiny_checkpoint_factory, tmp_path_factory):
    model_dir = tiny_checkpoint_factory("safetensors", seed=13)
    return build_engine(model_dir, tmp_path_factory.mktemp("stop") / "engine")


def texts(session, prompts: list[list[int]], **setting) -> tuple[list[list[int]], list[str]]:
    tokenizer = ChatGLMTokenizer.from_dir(session.engine_dir)
    outputs = [output.token_ids for output in session.generate(prompts, SamplingConfig(max_new_tokens=20, end_id=-1,
                                                                                        **setting))]
    return outputs, [tokenizer.decode(output) for output in outputs]


def test_generation_stops_before_the_stop_string(session, tmp_path):
    prompts = [random_prompt(5, 1), random_prompt(9, 2)]
    plain, plain_texts = texts(session, prompts)
    tokenizer = ChatGLMTokenizer.from_dir(session.engine_dir)
    # Two characters across the boundary between the first output's tokens 6 and 7.
    boundary = len(tokenizer.decode(plain[0][:6]))
    stop = plain_texts[0][boundary - 1:boundary + 1]
    assert len(stop) == 2 and plain_texts[0].find(stop) == boundary - 1
    outputs, stopped_texts = texts(session, prompts, stop_words=(stop,))
    for output, text, full, full_ids in zip(outputs, stopped_texts, plain_texts, plain):
        where = full.find(stop)
        if where < 0:
            assert output == full_ids  # never found: nothing held back at the end
        else:
            assert stop not in text and full.startswith(text) and len(text) <= where
            assert full_ids[:len(output)] == output  # a prefix of the plain tokens
            assert len(tokenizer.decode(full_ids[:len(output) + 1])) > where  # the next token reaches the stop
    assert outputs[0] == plain[0][:5]  # token 6 holds the stop's first character
    (tmp_path / "p.csv").write_text(",".join(map(str, prompts[0])) + "\n")
    from conftest import run_tool

    result = run_tool("run.py", "--engine_dir", session.engine_dir, "--input_tokens", tmp_path / "p.csv",
                      "--max_output_len", "20", "--output_csv", tmp_path / "o.csv", "--stop_words", stop)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o.csv").read_text().strip() == ",".join(map(str, plain[0][:5]))


def test_held_back_tokens_are_returned_when_no_stop_string_comes(session):
    """A stop string whose first characters end the text, but which never completes."""
    prompts = [random_prompt(6, 3)]
    plain, plain_texts = texts(session, prompts)
    tokenizer = ChatGLMTokenizer.from_dir(session.engine_dir)
    partial = tokenizer.decode(plain[0][:4])[-1] + "\u2603never"  # begins with a character of the text
    outputs, _ = texts(session, prompts, stop_words=(partial,))
    assert outputs == plain


class Letters:
    """A tokenizer whose token i is the letter chr(ord("a") + i)."""

    silent_ids: frozenset[int] = frozenset()

    def decode(self, ids, hold_incomplete: bool = False, within_text: bool = False) -> str:
        return "".join(chr(ord("a") + i) for i in ids)

    def unfinished_tail(self, ids) -> int:
        return 0


def test_stop_strings_watch_only_the_text(session):
    watcher = StopStrings(("ab", "xyz"), Letters())
    assert watcher.visible([0], final=False) == (0, False)  # "a" may begin "ab": held
    assert watcher.visible([0, 2], final=False) == (2, False)  # "ac": nothing to hold
    assert watcher.visible([2, 0, 1, 3], final=False) == (1, True)  # "cabd": cut before "ab"
    assert watcher.visible([0], final=True) == (1, False)  # the end releases what was held


def test_stop_words_need_a_tokenizer(session, tmp_path):
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(session.engine_dir, engine)
    (engine / "tokenizer.model").unlink()
    import json

    config = json.loads((engine / "config.json").read_text())
    config["tokenizer_files"].remove("tokenizer.model")
    del config["checksums"]["tokenizer.model"]
    from glm_engine.engine_format.engine import config_digest

    config["config_sha256"] = config_digest(config)
    (engine / "config.json").write_text(json.dumps(config))
    bare = load_session(engine, "cpu")
    with pytest.raises(GlmEngineError, match="stop words, which are matched on text"):
        bare.generate([[5, 6]], SamplingConfig(max_new_tokens=4, stop_words=("x",)))
    with pytest.raises(GlmEngineError, match="stop words must be non-empty strings"):
        SamplingConfig(max_new_tokens=4, stop_words=("",))


def whole_text_visible(strings: tuple[str, ...], tokenizer, output: list[int], final: bool) -> tuple[int, bool]:
    """StopStrings.visible as decoding the whole text, and every prefix, would answer."""
    text = tokenizer.decode(output)

    def within(chars: int) -> int:
        count = len(output)
        while count and len(tokenizer.decode(output[:count])) > chars:
            count -= 1
        return count

    found = [position for position in (text.find(string) for string in strings) if position >= 0]
    if found:
        return within(min(found)), True
    if final:
        return len(output), False
    held = max((size for string in strings for size in range(1, len(string)) if text.endswith(string[:size])),
               default=0)
    return within(len(text) - held), False


def test_stop_strings_answer_as_decoding_the_whole_text_would():
    """At every step whose text ends with a whole character, and at the end."""
    rng = random.Random(0)
    for _ in range(300):
        ids = random_ids(rng, rng.randrange(1, 40))
        full = DEMO_TOKENIZER.decode(ids)
        picks = [full[start:start + rng.randrange(1, 5)] for start in rng.sample(range(len(full)), min(2, len(full)))]
        strings = tuple(string for string in picks if string) or ("\u2603",)
        watcher, output = StopStrings(strings, DEMO_TOKENIZER), []
        while len(output) < len(ids):
            output += ids[len(output):len(output) + rng.randrange(1, 4)]
            final = len(output) == len(ids)
            answer = watcher.visible(output, final)
            if final or DEMO_TOKENIZER.unfinished_tail(output) == 0:
                assert answer == whole_text_visible(strings, DEMO_TOKENIZER, output, final), (ids, strings, output)
            assert watcher.visible(output, final) == answer  # asked again (a preempted sequence): the same
            if answer[1]:
                break


def test_stop_strings_decode_each_token_a_few_times_not_the_whole_text_each_step():
    tokenizer = CountingTokenizer(DEMO_TOKENIZER)
    ids = random_ids(random.Random(1), 3000)
    watcher, output = StopStrings(("\u2603 never", "\u2604"), tokenizer), []
    for token in ids:
        output.append(token)
        assert watcher.visible(output, final=False)[1] is False
    assert watcher.visible(output, final=True) == (len(ids), False)
    assert tokenizer.decoded <= 4 * len(ids)  # decoding the whole text each step: len(ids) ** 2 / 2
