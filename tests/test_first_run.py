"""What a newcomer meets first: dummy engines that print text with no tokenizer given,
the README's Python example as copied, streaming that prints each text once, and
reports that say what ran."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY_SHAPE_FLAGS, run_tool
from glm_engine.text.tokenizer import ChatGLMTokenizer

SMALL = [*TINY_SHAPE_FLAGS[:-2], "--max_input_len", "64", "--max_output_len", "8"]


@pytest.mark.parametrize("vocab_size, tokens", [(1024, 1005), (320, None)])
def test_dummy_engines_carry_a_demo_tokenizer_that_fits_and_run_py_prints_text(tiny_engine_factory, vocab_size,
                                                                              tokens):
    engine_dir = tiny_engine_factory(*SMALL, "--vocab_size", str(vocab_size))
    tokenizer = ChatGLMTokenizer.from_dir(engine_dir)
    assert tokenizer.vocab_size <= vocab_size and (tokens is None or tokenizer.vocab_size == tokens)
    result = run_tool("run.py", "--engine_dir", engine_dir, "--max_output_len", "4")  # the default prompt
    assert result.returncode == 0, result.stderr
    assert "\t续写：北京市教育资源丰富" in result.stdout and "Output --->" in result.stdout


def test_build_says_which_tokenizer_went_in(tmp_path):
    result = run_tool("build.py", *SMALL, "--vocab_size", "1024", "--output_dir", tmp_path / "engine",
                      "--log_level", "info")
    assert "tokenizer: the bundled demo tokenizer" in result.stderr


def test_the_bundled_demo_tokenizer_is_the_one_the_script_makes(tmp_path):
    from make_demo_tokenizer import BUNDLED_DIR, train_demo_tokenizer

    fresh = train_demo_tokenizer(tmp_path)
    assert (fresh / "tokenizer.model").read_bytes() == (BUNDLED_DIR / "tokenizer.model").read_bytes()


def test_the_bundled_glm4_demo_tokenizer_is_the_one_the_script_makes(tmp_path):
    from make_demo_tokenizer import GLM4_BUNDLED_DIR, train_glm4_demo_tokenizer

    fresh = train_glm4_demo_tokenizer(tmp_path)
    assert (fresh / "tokenizer.model").read_bytes() == (GLM4_BUNDLED_DIR / "tokenizer.model").read_bytes()


def test_streaming_several_prompts_prints_each_block_once(tiny_engine_factory, tmp_path):
    engine_dir = tiny_engine_factory(*SMALL, "--vocab_size", "1024")
    prompts = ["Hello", "北京", "The weather"]
    common = ["--engine_dir", engine_dir, "--max_output_len", "6", "--input_text", *prompts]
    plain = run_tool("run.py", *common, "--output_csv", tmp_path / "plain.csv")
    streamed = run_tool("run.py", *common, "--streaming", "--output_csv", tmp_path / "streamed.csv")
    assert streamed.returncode == 0, streamed.stderr
    assert (tmp_path / "plain.csv").read_text() == (tmp_path / "streamed.csv").read_text()
    plain_outputs = re.findall(r"Output --->\n\t(.*)\n", plain.stdout)
    for index, prompt in enumerate(prompts):  # not a terminal: each block once, when it finishes, as without streaming
        assert streamed.stdout.count(f"Input --->\n\t{prompt}\n") == 1
        assert streamed.stdout.count(f"Output --->\n\t{plain_outputs[index]}\n") == 1


def test_streaming_to_a_terminal_redraws_one_line_per_prompt(tiny_engine_factory):
    engine_dir = tiny_engine_factory(*SMALL, "--vocab_size", "1024")
    main, secondary = pty.openpty()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TRITON_INTERPRET", None)
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "run.py"), "--engine_dir", str(engine_dir),
                                "--max_output_len", "5", "--streaming", "--input_text", "Hello", "北京"],
                               stdout=secondary, stderr=subprocess.PIPE, env=env)
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=120) == 0, process.stderr.read()
    text = output.decode()
    assert text.count("\x1b[2F") >= 4  # redrawn in place: back up two lines per step
    assert "\t[0] Hello" in text and "\t[1] 北京" in text
    assert text.count("Input") == 1


def test_streamed_responses_add_up_to_the_printed_text(tiny_tokenizer_dir):
    """run.py's streamed pieces of a prompt join into the text it prints at the end
    (clean_response: stripped, ASCII marks next to Chinese full-width), for random token
    streams of marks, spaces, Chinese, byte pieces and special ids, and with no tokenizer."""
    import random

    from run import StreamedResponse, response_text

    tokenizer = ChatGLMTokenizer.from_dir(tiny_tokenizer_dir)
    words = [tokenizer.encode(text, add_prefix=False) for text in (",", "!", ":", ";", "?", " ", "\n", "北京", "中",
                                                                   "a", " b", "你好")]
    rng = random.Random(0)
    for trial in range(300):
        output = [token for _ in range(rng.randrange(1, 12)) for token in rng.choice(
            words + [[rng.randrange(tokenizer.vocab_size)], [tokenizer.eos_token_id]])]
        for with_tokenizer in (tokenizer, None):
            response, printed, given = StreamedResponse(with_tokenizer), "", 0
            while given < len(output):
                step = rng.randrange(1, 4)
                printed += response.add(output[given:given + step], final=given + step >= len(output))
                given += step
            assert printed == response.shown == response_text(with_tokenizer, output), output


def test_live_lines_show_the_end_of_long_texts():
    from run import screen_line

    for text in ["short", "a  b\tc\n" * 200, "x" * 500 + " " * 3000, " " * 3000 + "end", "中文" * 300 + "\x1b"]:
        line = " ".join("".join(c if c.isprintable() else " " for c in "[1] " + text).split())
        assert screen_line("[1] ", text, 40) == (line if len(line) <= 40 else "…" + line[-39:])


def test_benchmark_reports_the_cuda_graphs_that_ran(tiny_engine_factory, tmp_path):
    engine_dir = tiny_engine_factory(*SMALL, "--vocab_size", "1024")
    result = run_tool("benchmark.py", "--engine_dir", engine_dir, "--input_len", "4", "--output_len", "2",
                      "--repeats", "1", "--device", "cpu", "--output_json", tmp_path / "result.json")
    assert result.returncode == 0, result.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["cuda_graphs"] is False and result["prompt_graphs"] is False


def test_decode_holds_a_split_character_and_marks_what_is_not_text(tiny_tokenizer_dir):
    tokenizer = ChatGLMTokenizer.from_dir(tiny_tokenizer_dir)
    byte = lambda value: tokenizer.sp_model.piece_to_id(f"<0x{value:02X}>")  # noqa: E731
    bei = [byte(0xE5), byte(0x8C), byte(0x97)]  # 北, byte by byte
    assert tokenizer.decode(bei) == "北"
    assert tokenizer.decode(bei[:2], hold_incomplete=True) == ""
    assert tokenizer.decode([byte(0x41), *bei[:1]], hold_incomplete=True) == "A"
    assert "\ufffd" not in tokenizer.decode(bei[:2]) and "⁇" in tokenizer.decode(bei[:2])
    assert "⁇" in tokenizer.decode([tokenizer.vocab_size + 3])  # an id the tokenizer lacks


@pytest.mark.parametrize("tool", ["build.py", "run.py", "summarize.py", "benchmark.py", "serve.py"])
def test_help_answers_without_loading_torch_and_shows_defaults(tool):
    code = (f"import runpy, sys\nsys.argv = [{tool!r}, '--help']\ntry:\n    runpy.run_path({tool!r}, "
            "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch loaded:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch loaded: False" in result.stdout
    options = re.findall(r"^  (--\w+)", result.stdout, re.M)
    described = re.findall(r"^  --\w+.*?(?=^  -|\Z)", result.stdout, re.M | re.S)
    undescribed = [option for option, text in zip(options, described) if "default" not in text and "required"
                   not in text and "refused" not in text and "not run" not in text]
    assert options and undescribed == []
