"""Generates text with an engine for one or more prompts (TensorRT-LLM's
ChatGLM2-6B run.py flags and output). Engines built with --use_inflight_batching
take any number of prompts, max_batch_size of them in flight at a time."""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

# Light imports only up here: --help answers without loading torch; main() imports the rest.
from glm_engine.tools.cli import missing_package  # the standard library only: imports in any Python

try:
    from glm_engine import GlmEngineError
    from glm_engine.tools.cli import (MAX_PROMPT_TOKENS, MAX_PROMPTS, add_sampling_arguments, add_session_arguments,
                                      kv_cache_options, run_tool, sampling_options, setup_logging,
                                      speculative_options)
    from glm_engine.text.detokenizer import IncrementalDetokenizer
    from glm_engine.text.prompts import chat_prompt_ids, clean_response, write_token_csv
    from glm_engine.text.tokenizer import ChatGLMTokenizer, has_tokenizer
    from glm_engine.text.tokenizer import load_tokenizer as load_tokenizer_dir
except ModuleNotFoundError as error:
    missing_package(error)

if TYPE_CHECKING:
    from glm_engine.config import BuildConfig, ModelConfig
    from glm_engine.runtime.scheduler import StepResult
    from glm_engine.runtime.session import RequestOutput

DEFAULT_INPUT_TEXT = "续写：北京市教育资源丰富"
HELD_MARKS = ",!:;?"  # ASCII marks that clean_response turns full-width next to a Chinese character


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine_dir", type=str, default="trtModel", help="the engine (default: %(default)s)")
    parser.add_argument("--tokenizer_dir", type=str, default=None, help="(default: the engine directory)")
    parser.add_argument("--input_text", type=str, nargs="+", default=None,
                        help=f"prompts; [gMASK] sop is prepended (default: {DEFAULT_INPUT_TEXT})")
    parser.add_argument("--input_tokens", type=str, default=None,
                        help="CSV file, one prompt of token ids per line, used exactly as given (default: none)")
    parser.add_argument("--chat", action="store_true",
                        help="each --input_text is a user message, put in the model family's chat format (ChatGLM2's "
                             "rounds, ChatGLM3's and GLM-4's role tokens), as serve.py's chat endpoint does "
                             "(default: plain prompts)")
    parser.add_argument("--max_output_len", type=int, default=None,
                        help="most tokens to generate per prompt (default: the engine's max_output_len)")
    parser.add_argument("--end_id", type=int, nargs="+", default=None, metavar="ID",
                        help="token ids that end generation, in place of the model's (default: config.json's "
                             "eos_token_id, every id of its list); beam search takes one")
    add_sampling_arguments(parser)
    parser.add_argument("--random_seed", type=int, default=None,
                        help="seed of sampling, in [0, 2**64) (default: a fresh one per run)")
    parser.add_argument("--output_csv", type=str, default=None,
                        help="write each prompt's generated ids (end token excluded) as a CSV line (default: none)")
    parser.add_argument("--output_log_probs", type=str, default=None,
                        help="write a JSON list, one object per prompt: the log-probability of each generated token "
                             "under the distribution it was chosen from, and their sum (default: none)")
    parser.add_argument("--streaming", action="store_true",
                        help="print the text as it is generated (default: off)")
    add_session_arguments(parser, log_level="error")
    return parser.parse_args(argv)


def load_tokenizer(args: argparse.Namespace, required: bool) -> ChatGLMTokenizer | None:
    directory = Path(args.tokenizer_dir or args.engine_dir)
    if not has_tokenizer(directory):
        if required:
            raise GlmEngineError(f"no tokenizer.model or tokenizer.json in {directory}: pass "
                                 "--tokenizer_dir, or give token ids with --input_tokens")
        return None
    return load_tokenizer_dir(directory)


def response_text(tokenizer: ChatGLMTokenizer | None, output: list[int]) -> str:
    """What run.py prints for generated ids: cleaned text, or the ids without a tokenizer."""
    if tokenizer is None:
        return ",".join(map(str, output))
    return clean_response(tokenizer.decode(output))


class StreamedResponse:
    """One prompt's response printed while it is generated: each step's new tokens are
    decoded once (IncrementalDetokenizer) and cleaned as the whole text is
    (clean_response), holding back what later text may still change: trailing
    whitespace, which the final strip drops, and trailing ASCII marks, which a Chinese
    character after them turns full-width. The pieces add up to response_text()."""

    def __init__(self, tokenizer: ChatGLMTokenizer | None) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.shown = ""  # printed so far
        self.waiting = ""  # text decoded but not printed yet
        self.before = ""  # the last character printed, as decoded (a mark after a Chinese one turns full-width)

    def add(self, tokens: list[int], final: bool) -> str:
        """Takes a step's tokens of the prompt; returns the text to print after the rest."""
        if self.detokenizer is None:
            new = ("," if self.shown and tokens else "") + ",".join(map(str, tokens))
            self.shown += new
            return new
        text = self.waiting + self.detokenizer.add(tokens) + (self.detokenizer.finish() if final else "")
        ready = text.rstrip() if final else text.rstrip().rstrip(HELD_MARKS).rstrip()
        self.waiting = text[len(ready):]
        if not ready:
            return ""
        new = clean_response(self.before + ready)[len(self.before):]  # nothing printed yet: it strips the start
        self.before = ready[-1]
        self.shown += new
        return new


def print_block(text: str, response: str, label: str = "") -> None:
    print(f"\nInput{label} --->\n\t" + text)
    print(f"\nOutput{label} --->\n\t" + response)


class LiveLines:
    """Several prompts streaming to a terminal: one line per prompt, redrawn in place."""

    def __init__(self, count: int, stream=sys.stdout) -> None:
        self.count, self.stream, self.drawn = count, stream, False

    def draw(self, texts: list[str]) -> None:
        """Redraws the lines: prompt i's text after "[i] "."""
        width = shutil.get_terminal_size().columns - 1
        out = f"\x1b[{self.count}F" if self.drawn else ""  # back to the first line
        for index, text in enumerate(texts):
            out += "\x1b[2K" + screen_line(f"[{index}] ", text, width) + "\n"
        self.stream.write(out)
        self.stream.flush()
        self.drawn = True


def screen_line(label: str, text: str, width: int) -> str:
    """`label` and `text` on one screen line of `width` characters: unprintable
    characters and runs of whitespace as one space, the ends stripped, and when it is
    longer, "…" and its end. Reads only about as much of the end of `text` as it shows."""
    size = 2 * width
    while True:
        part = text[-size:] if size < len(text) else label + text  # its screen text ends the whole one's
        shown = " ".join("".join(c if c.isprintable() else " " for c in part).split())
        if len(shown) > width or size >= len(text):
            return shown if len(shown) <= width else "…" + shown[-(width - 1):]
        size *= 2


def print_outputs(texts: list[str], outputs: list[RequestOutput], tokenizer: ChatGLMTokenizer | None) -> None:
    """Each prompt's Output block; a prompt given several beams (--num_return_sequences)
    prints each with its score."""
    for text, output in zip(texts, outputs):
        if len(output.beams) < 2:
            print_block(text, response_text(tokenizer, output.token_ids))
            continue
        print(f"\nInput --->\n\t{text}")
        for rank, (ids, score) in enumerate(output.beams):
            print(f"\nOutput beam {rank} (score {score:.4f}) --->\n\t{response_text(tokenizer, ids)}")


def write_log_probs(path: str, log_probs: list[list[float]]) -> None:
    """--output_log_probs: one object per prompt, its tokens' log-probabilities and their sum."""
    import json

    from glm_engine.tools.output_file import output_stream

    with output_stream(path, "--output_log_probs") as stream:
        json.dump([{"log_probs": values, "cum_log_prob": sum(values)} for values in log_probs], stream, indent=1)


class StreamDisplay:
    """--streaming: each prompt's text printed as it comes, once: one prompt streams into
    its Output block; several stream one line each on a terminal, or print each block,
    as without --streaming, as its prompt finishes when the output is not a terminal.
    Each step's new tokens are decoded once (StreamedResponse)."""

    def __init__(self, texts: list[str], tokenizer: ChatGLMTokenizer | None) -> None:
        self.texts, self.tokenizer = texts, tokenizer
        self.single, self.live = len(texts) == 1, len(texts) > 1 and sys.stdout.isatty()
        self.responses = [StreamedResponse(tokenizer) for _ in texts]
        self.lines = None
        if self.single:
            print(f"\nInput --->\n\t{texts[0]}\n\nOutput --->\n\t", end="", flush=True)
        if self.live:
            print("\nInput --->\n" + "\n".join(f"\t[{i}] {text}" for i, text in enumerate(texts)) + "\n\nOutput --->")
            self.lines = LiveLines(len(texts))

    def show(self, step: StepResult, outputs: list[RequestOutput]) -> None:
        """Prints a step's news; `outputs` already hold its tokens."""
        new: dict[int, list[int]] = {}
        for index, token in step.tokens:
            new.setdefault(index, []).append(token)
        if self.single:
            print(self.responses[0].add(new.get(0, []), final=bool(step.finished)), end="", flush=True)
        elif self.live:
            for index in new.keys() | set(step.finished):
                self.responses[index].add(new.get(index, []), final=index in step.finished)
            self.lines.draw([response.shown for response in self.responses])
        else:
            for index in step.finished:
                print_block(self.texts[index], response_text(self.tokenizer, outputs[index].token_ids))

    def finish(self) -> None:
        """Prints what a stream that ended unfinished held back, and ends the output."""
        tails = [response.add([], final=True) for response in self.responses]
        if self.single:
            print(tails[0], end="")
        if self.live:
            self.lines.draw([response.shown for response in self.responses])
        print()


def decoded_line(path: str, line: bytes, offset: int) -> str:
    """A line of an --input_tokens file (starting at byte `offset`) as text."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise GlmEngineError(f"--input_tokens {path} is not UTF-8 text (byte {offset + error.start}); give a CSV "
                             "file of token ids") from None


def prompt_ids(path: str, line_number: int, text: str) -> list[int]:
    """The token ids of a line of an --input_tokens file."""
    try:
        cells = [cell.strip() for cell in next(csv.reader([text]), [])]
    except csv.Error as error:
        raise GlmEngineError(f"--input_tokens {path} is not a CSV file ({error})") from None
    if not any(cells):
        raise GlmEngineError(f"{path} line {line_number}: empty prompt")
    bad = next((cell for cell in cells if not re.fullmatch(r"-?[0-9]{1,100}", cell)), None)
    if bad is not None:
        raise GlmEngineError(f"{path} line {line_number}: {bad[:40]!r} is not a token id; each line must be "
                             "comma-separated integers")
    return [int(cell) for cell in cells]


def read_input_tokens(path: str, max_input_len: int) -> list[list[int]]:
    """--input_tokens: one prompt of comma-separated token ids per line, from a file or a
    pipe, read a line at a time with the limits checked as it goes, so that no input,
    an endless one included, takes more memory than a run can use: a line longer than
    max_input_len ids can be (csv's field limit, plus 32 bytes an id) is refused as soon
    as it is; at most MAX_PROMPTS prompts, MAX_PROMPT_TOKENS tokens in all (prompts beyond
    max_batch_size wait in the engine's queue). Text that is not UTF-8 is named before a
    line that is not token ids."""
    source = Path(path)
    if not source.exists():
        raise GlmEngineError(f"--input_tokens {path}: no such file")
    if source.is_dir():
        raise GlmEngineError(f"--input_tokens {path} is a directory; give a CSV file")
    line_limit = csv.field_size_limit() + 32 * max_input_len
    prompts, tokens, lines, offset, bad_line = [], 0, 0, 0, None
    try:
        with open(source, "rb") as stream:
            while len(prompts) <= MAX_PROMPTS and tokens <= MAX_PROMPT_TOKENS and \
                    (line := stream.readline(line_limit + 1)):
                lines += 1
                if len(line) > line_limit:
                    raise GlmEngineError(f"--input_tokens {path} is not a CSV file of prompts this engine takes: line "
                                         f"{lines} runs past {line_limit} bytes, more than {max_input_len} token ids "
                                         "(its max_input_len) can take")
                text = decoded_line(path, line, offset)
                if bad_line is None:
                    try:
                        prompts.append(prompt_ids(path, lines, text))
                        tokens += len(prompts[-1])
                    except GlmEngineError as error:  # told once the rest is known to be text
                        bad_line = error
                offset += len(line)
    except OSError as error:
        raise GlmEngineError(f"--input_tokens {path}: {error.strerror}") from None
    if bad_line is not None:
        raise bad_line
    if len(prompts) > MAX_PROMPTS or tokens > MAX_PROMPT_TOKENS:
        raise GlmEngineError(f"--input_tokens {path} holds more than {MAX_PROMPTS} prompts or {MAX_PROMPT_TOKENS} "
                             "tokens, more than one run takes; split it into several runs")
    if not prompts:
        raise GlmEngineError(f"--input_tokens {path} holds no prompt")
    return prompts


def read_prompts(args: argparse.Namespace, tokenizer: ChatGLMTokenizer | None,
                 build_config: BuildConfig) -> tuple[list[list[int]], list[str]]:
    """The prompts' token ids and the texts shown for them (--input_tokens or --input_text)."""
    if args.input_tokens is not None:
        prompts = read_input_tokens(args.input_tokens, build_config.max_input_len)
        return prompts, [tokenizer.decode(p) if tokenizer else ",".join(map(str, p)) for p in prompts]
    texts = args.input_text or [DEFAULT_INPUT_TEXT]
    if not all(text.strip() for text in texts):
        raise GlmEngineError("--input_text holds an empty prompt")
    if args.chat:
        return [chat_prompt_ids(tokenizer, [("user", text)]) for text in texts], texts
    return [tokenizer.encode(text) for text in texts], texts


def end_options(args: argparse.Namespace, model_config: ModelConfig) -> dict:
    """SamplingConfig's end_id and stop_token_ids: --end_id's, or the model's."""
    if args.end_id is None:
        return model_config.end_options(args.num_beams)
    outside = [token for token in args.end_id if not 0 <= token < model_config.vocab_size]
    if outside:
        raise GlmEngineError(f"--end_id {outside[0]} is not a token id of this engine (0 to "
                             f"{model_config.vocab_size - 1})")
    if args.num_beams > 1 and len(args.end_id) > 1:
        raise GlmEngineError("--num_beams: beam search ends at one --end_id; give one")
    return {"end_id": args.end_id[0], "stop_token_ids": tuple(args.end_id[1:])}


def print_summary(args: argparse.Namespace, prompts: int, tokens: int, seconds: float) -> None:
    """The run in one line on stderr (stdout holds the outputs alone): tokens, time, speed
    and where the files went."""
    written = "".join(f"; {flag} {path}" for flag, path in (("--output_csv", args.output_csv),
                                                            ("--output_log_probs", args.output_log_probs)) if path)
    print(f"run.py: {prompts} prompt{'s' if prompts != 1 else ''}, {tokens} tokens generated in {seconds:.2f} s "
          f"({tokens / max(seconds, 1e-9):.1f} tokens/s){written}", file=sys.stderr)


def main() -> None:
    args = parse_arguments()
    setup_logging(args.log_level)
    from glm_engine.engine_format.engine import engine_configs
    from glm_engine.tools.output_file import check_output_file
    from glm_engine.runtime.sampling import SamplingConfig
    from glm_engine.runtime.session import RequestOutput, record_step, resolve_device
    from model import load_session

    if args.input_tokens is not None and args.input_text is not None:
        raise GlmEngineError("give the prompts as --input_text or as --input_tokens, not both")
    if args.chat and args.input_tokens is not None:
        raise GlmEngineError("--chat formats --input_text as chat messages; --input_tokens are used as given")
    for flag, path in (("--output_csv", args.output_csv), ("--output_log_probs", args.output_log_probs)):
        if path is not None:
            check_output_file(path, flag)
    device = resolve_device(args.device)
    model_config, build_config = engine_configs(args.engine_dir)  # a clear error before any other work
    tokenizer = load_tokenizer(args, required=args.input_tokens is None)
    sampling = SamplingConfig(max_new_tokens=build_config.max_output_len if args.max_output_len is None
                              else args.max_output_len, random_seed=args.random_seed,
                              output_log_probs=args.output_log_probs is not None, **sampling_options(args, tokenizer),
                              **end_options(args, model_config))
    if args.streaming and sampling.num_beams > 1:
        raise GlmEngineError("--streaming shows tokens as they come, and beams are known only when the search ends; "
                             "drop --streaming or --num_beams")
    prompts, texts = read_prompts(args, tokenizer, build_config)
    session = load_session(args.engine_dir, device, tokenizer=tokenizer, **kv_cache_options(args),
                           **speculative_options(args))
    session.check_requests(prompts, sampling)  # before anything is printed
    # Tensor parallelism: every rank computes the same steps, rank 0 prints.
    display = StreamDisplay(texts, tokenizer) if args.streaming and session.is_main_rank else None
    outputs = [RequestOutput() for _ in prompts]
    start, tokens = time.perf_counter(), 0
    for step in session.stream(prompts, sampling):
        record_step(outputs, step)
        tokens += len(step.tokens)
        if display is not None:
            display.show(step, outputs)
    seconds = time.perf_counter() - start
    if not session.is_main_rank:
        return
    if display is not None:
        display.finish()
    else:
        print_outputs(texts, outputs, tokenizer)
    if args.output_csv is not None:
        write_token_csv(args.output_csv, [ids for output in outputs for ids in output.returned])
    if args.output_log_probs is not None:
        write_log_probs(args.output_log_probs, [output.log_probs for output in outputs])
    sys.stdout.flush()  # the outputs before the summary, where both go to one terminal
    print_summary(args, len(prompts), tokens, seconds)


if __name__ == "__main__":
    run_tool(main, writes_stdout=True)
