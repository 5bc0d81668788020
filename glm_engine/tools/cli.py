"""What the command-line tools share: logging set-up and turning user errors
into one-line messages. The standard library only, so that a tool started by a
Python without the project's packages can still say so in one line."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from glm_engine import GlmEngineError
from glm_engine.runtime.drafting import MODES as SPECULATIVE_MODES, SpeculativeConfig

LOG_LEVELS = {"verbose": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
              "warning": logging.WARNING, "error": logging.ERROR, "internal_error": logging.ERROR}


# The most prompts, and prompt tokens, one run of run.py or benchmark.py holds in memory
# (as Python lists, about 40 bytes a token: under a GiB).
MAX_PROMPTS = 2**20
MAX_PROMPT_TOKENS = 2**24

# Writes that fail for want of room: a full disk, a full quota, a file size limit.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# Libraries whose info lines are noise in a tool's output (absl: rouge_score's "Using default tokenizer.").
THIRD_PARTY_LOGGERS = ("absl", "datasets", "transformers", "huggingface_hub", "urllib3", "filelock", "fsspec")


def launched_rank() -> int:
    """This process's rank when torchrun or mpirun started it (0 otherwise), from the
    launcher's variables: known before torch.distributed starts."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def setup_logging(level: str) -> None:
    """The tools' log lines at `level` (ranks other than 0: warnings and errors only);
    third-party libraries' at warning or above."""
    rank = launched_rank()
    if rank:
        level = max(level, "warning", key=lambda name: LOG_LEVELS[name])
    logging.basicConfig(level=LOG_LEVELS[level], datefmt="%H:%M:%S",
                        format=f"[%(asctime)s] %(levelname)s {f'rank {rank} ' if rank else ''}%(name)s: %(message)s")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, LOG_LEVELS[level]))


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (staging directories,
    temporary files) runs as it does for Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def _cuda_out_of_memory() -> tuple[type[BaseException], ...]:
    """torch's CUDA out-of-memory error, when torch is loaded (it is by then, if it matters)."""
    torch = sys.modules.get("torch")
    return (torch.cuda.OutOfMemoryError,) if torch is not None else ()


def tool_name() -> str:
    """The running tool's name for its messages ("run.py"; "run.py (rank 1)" past rank 0)."""
    prog = sys.argv[0].rsplit("/", 1)[-1]
    return f"{prog} (rank {launched_rank()})" if launched_rank() else prog


def fail(message: str) -> NoReturn:
    """Ends the tool with `prog: error: message` on one line and exit status 1."""
    print(f"{tool_name()}: error: {message}".replace("\n", "\\n"), file=sys.stderr)
    sys.exit(1)


def missing_package(error: ModuleNotFoundError) -> NoReturn:
    """Ends the tool in one line when a package it needs is not installed in this Python
    (a bare python3 instead of the project's .venv, or a partial install)."""
    if sys.prefix != sys.base_prefix:  # a virtual environment, missing the package
        fix = "install the project's requirements into it: bash scripts/setup.sh, or pip install -r requirements.txt"
    else:
        fix = "run the tools with the project's .venv/bin/python (bash scripts/setup.sh creates .venv)"
    fail(f"the Python package {error.name!r} is not installed for {sys.executable}; {fix}")


def _drop_stdout() -> None:
    """Points stdout at /dev/null, so that Python's flush at exit does not fail again on
    what is still buffered for a closed pipe or a full disk."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no stdout, or one without a descriptor
        pass


def run_tool(main: Callable[[], None], writes_stdout: bool = False) -> None:
    """Runs a tool's main; a GlmEngineError becomes `prog: error: message` and exit status 1,
    running out of memory or disk space a one-line error too, a missing package one naming
    the fix, SIGTERM and Ctrl-C a clean exit. A tool that `writes_stdout` (its results)
    refuses a closed stdout at once, and stops quietly, as Unix tools do, when the reader
    of its output goes away (`| head`)."""
    if writes_stdout and sys.stdout is None:
        fail(f"standard output is closed, and {tool_name()} prints its results there; redirect it instead "
             "(> file, or > /dev/null)")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
        if writes_stdout:
            sys.stdout.flush()  # a closed pipe or a full disk shows here, not in Python's exit
    except GlmEngineError as error:
        fail(str(error))
    except (MemoryError, *_cuda_out_of_memory()) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        fail(f"out of memory ({reason}); use a smaller batch, shorter sequences or a smaller engine")
    except BrokenPipeError:  # the reader went away: nothing more to say to it, nor on stderr
        _drop_stdout()
        sys.exit(128 + signal.SIGPIPE)  # the status of a tool a closed pipe stops
    except OSError as error:
        if error.errno not in NO_ROOM:
            raise
        _drop_stdout()
        written = f" {error.filename}" if error.filename else ""
        fail(f"writing{written} failed: {error.strerror}; free some space or write elsewhere, then run it again")
    except ModuleNotFoundError as error:
        missing_package(error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_session_arguments(parser: argparse.ArgumentParser, log_level: str = "info",
                          prefix_caching: bool = False) -> None:
    """The flags of a tool that loads one session: --device, --log_level (default
    `log_level`) and the KV pool's sizing and prefix caching (default `prefix_caching`)."""
    parser.add_argument("--device", type=str, default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--log_level", choices=list(LOG_LEVELS), default=log_level, help="(default: %(default)s)")
    add_kv_cache_arguments(parser, prefix_caching)
    add_speculative_arguments(parser)


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    """Speculative decoding's flags (runtime/drafting.py), as TensorRT-LLM's run.py spells them."""
    parser.add_argument("--speculative_decoding_mode", choices=list(SPECULATIVE_MODES), default=None,
                        help="decoding steps verify drafts of several next tokens at once: prompt_lookup drafts "
                             "the tokens that followed the latest earlier match of the sequence's last tokens, "
                             "draft_model the greedy guesses of --draft_engine_dir; "
                             "greedy output is unchanged, sampled output keeps its distribution; needs an engine "
                             "built with --max_draft_len (default: off)")
    parser.add_argument("--max_draft_len", type=int, default=None,
                        help="with --speculative_decoding_mode: the most draft tokens a sequence feeds a step "
                             "(default: the engine's --max_draft_len)")
    parser.add_argument("--prompt_lookup_max_ngram", type=int, default=None,
                        help="prompt_lookup: the longest n-gram matched, tried down to 1 (default: 3)")
    parser.add_argument("--draft_engine_dir", type=str, default=None,
                        help="draft_model: the engine that drafts, built from a smaller checkpoint with the same "
                             "tokenizer (e.g. a 2-layer model of the same family) (default: none)")


def speculative_options(args: argparse.Namespace) -> dict:
    """Session keyword arguments from add_speculative_arguments' flags."""
    mode = args.speculative_decoding_mode
    if mode is None:
        for flag in ("max_draft_len", "draft_engine_dir", "prompt_lookup_max_ngram"):
            if getattr(args, flag) is not None:
                raise GlmEngineError(f"--{flag} applies to speculative decoding; add --speculative_decoding_mode "
                                     "or drop it")
        return {}
    max_ngram = args.prompt_lookup_max_ngram
    if max_ngram is not None and mode != "prompt_lookup":
        raise GlmEngineError(f"--prompt_lookup_max_ngram applies to --speculative_decoding_mode prompt_lookup, not "
                             f"{mode}; drop it")
    return {"speculative": SpeculativeConfig(mode, args.max_draft_len, 3 if max_ngram is None else max_ngram,
                                             args.draft_engine_dir)}


def add_kv_cache_arguments(parser: argparse.ArgumentParser, prefix_caching: bool = False) -> None:
    """The run-time sizing of a paged KV cache (engines built with --paged_kv_cache) and
    prefix caching: --enable_prefix_caching where it is off by default, --no_prefix_caching
    where it is on (`prefix_caching`, serve.py's)."""
    caching_help = ("requests reuse the cached K/V of the prompt prefix they share with earlier ones (same "
                    "tokens, less prompt work)")
    if prefix_caching:
        parser.add_argument("--no_prefix_caching", dest="enable_prefix_caching", action="store_false",
                            help=f"turn prefix caching off; with it, {caching_help} (default: on)")
    else:
        parser.add_argument("--enable_prefix_caching", action="store_true",
                            help=f"{caching_help} (default: off)")
    parser.add_argument("--kv_cache_free_gpu_mem_fraction", type=float, default=None,
                        help="paged engines: share of the GPU memory free after loading that the KV pool takes "
                             "(default: 0.9)")
    parser.add_argument("--max_tokens_in_paged_kv_cache", type=int, default=None,
                        help="paged engines: size the KV pool in tokens instead (default: from free memory; on "
                             "the CPU, max_batch_size full sequences)")


def add_scheduler_arguments(parser: argparse.ArgumentParser, applies_to: str = "") -> None:
    """The in-flight scheduler's flags (serve.py, benchmark.py's serving modes);
    `applies_to` prefixes their help ("serving modes: ")."""
    parser.add_argument("--max_in_flight", type=int, default=None,
                        help=f"{applies_to}sequences per step (default and ceiling: the engine's max_batch_size)")
    parser.add_argument("--max_tokens_per_step", type=int, default=None,
                        help=f"{applies_to}prompt tokens read per step (a longer prompt takes a step of its own); "
                             "with --enable_chunked_context, all tokens of a step (default: 16384)")
    parser.add_argument("--enable_chunked_context", action="store_true",
                        help=f"{applies_to}read long prompts in chunks within each step's token budget, alongside "
                             "the running requests' decoding, instead of in steps of their own (default: off)")


def scheduler_options(args: argparse.Namespace) -> dict:
    """Scheduler keyword arguments of load_session / Session from add_scheduler_arguments' flags."""
    return {"max_in_flight": args.max_in_flight, "tokens_per_step": args.max_tokens_per_step,
            "chunked_prefill": args.enable_chunked_context}


def kv_cache_options(args: argparse.Namespace) -> dict:
    """Session keyword arguments from add_kv_cache_arguments' flags (prefix caching included)."""
    return {"kv_cache_free_gpu_mem_fraction": args.kv_cache_free_gpu_mem_fraction,
            "max_tokens_in_paged_kv_cache": args.max_tokens_in_paged_kv_cache,
            "prefix_caching": args.enable_prefix_caching}


def add_sampling_arguments(parser: argparse.ArgumentParser, words: bool = True) -> None:
    """How tokens are chosen: sampling, penalties, minimum length, beam search and (`words`,
    for tools with a tokenizer) bad and stop words: the fields of runtime/sampling.SamplingConfig."""
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature; given, it samples (--top_k 0 unless set) (default: 1.0)")
    parser.add_argument("--top_k", type=int, default=None,
                        help="1: greedy, 0: no top-k filter (default: 1, or 0 when --temperature or --top_p is "
                             "given)")
    parser.add_argument("--top_p", type=float, default=None,
                        help="nucleus sampling; given, it samples (--top_k 0 unless set); 0 or 1: no nucleus "
                             "filter (default: 0.0)")
    parser.add_argument("--repetition_penalty", type=float, default=1.0,
                        help="logits of tokens in the prompt or output divided by it when positive, multiplied "
                             "when negative, as Hugging Face's (default: %(default)s: off)")
    parser.add_argument("--presence_penalty", type=float, default=0.0,
                        help="subtracted from the logits of tokens already generated, as OpenAI's "
                             "(default: %(default)s)")
    parser.add_argument("--frequency_penalty", type=float, default=0.0,
                        help="subtracted once per earlier appearance in the output, as OpenAI's "
                             "(default: %(default)s)")
    parser.add_argument("--min_length", type=int, default=0,
                        help="tokens generated before the end token may come (default: %(default)s)")
    parser.add_argument("--num_beams", type=int, default=1,
                        help="beam search with N beams, as Hugging Face generate's (default: %(default)s: none)")
    parser.add_argument("--length_penalty", type=float, default=1.0,
                        help="beam scores are cumulative log-probability / length ** this (default: %(default)s)")
    parser.add_argument("--early_stopping", choices=["false", "true", "never"], default="false",
                        help="when beam search stops, as Hugging Face's early_stopping (default: %(default)s)")
    parser.add_argument("--num_return_sequences", type=int, default=1,
                        help="best beams returned per prompt (default: %(default)s)")
    if words:
        parser.add_argument("--bad_words", type=str, nargs="+", default=None,
                            help="words never generated: each is tokenized without the [gMASK] sop prefix, and "
                                 "its last token is banned after the others (default: none)")
        parser.add_argument("--stop_words", type=str, nargs="+", default=None,
                            help="generation stops when the text contains one; the text from it on is not "
                                 "returned (default: none)")


def token_choice(args: argparse.Namespace) -> dict:
    """temperature, top_k and top_p from their flags: greedy when none is given; --temperature
    or --top_p samples, from the whole distribution unless --top_k narrows it. --top_k 1
    (greedy) with either is refused: they would change nothing."""
    sampling_flags = [flag for flag, value in (("--temperature", args.temperature), ("--top_p", args.top_p))
                      if value is not None]
    top_k = args.top_k if args.top_k is not None else (0 if sampling_flags else 1)
    if top_k == 1 and sampling_flags:
        raise GlmEngineError(f"{sampling_flags[0]} shapes sampling, which --top_k 1 (greedy decoding) turns off; "
                             "drop --top_k 1 to sample, or drop " + " and ".join(sampling_flags))
    return {"temperature": 1.0 if args.temperature is None else args.temperature, "top_k": top_k,
            "top_p": 0.0 if args.top_p is None else args.top_p}


def sampling_options(args: argparse.Namespace, tokenizer) -> dict:
    """SamplingConfig keyword arguments from add_sampling_arguments' flags; `tokenizer`
    turns --bad_words into token ids (None: refused when --bad_words is given)."""
    bad_words, stop_words = (), tuple(getattr(args, "stop_words", None) or ())
    for flag in ("bad_words", "stop_words"):
        if getattr(args, flag, None) and tokenizer is None:
            raise GlmEngineError(f"--{flag} needs a tokenizer (words are tokenized, or matched on decoded text); "
                                 "pass --tokenizer_dir")
    if getattr(args, "bad_words", None):
        bad_words = tuple(tuple(tokenizer.encode(word, add_prefix=False)) for word in args.bad_words)
        empty = [word for word, ids in zip(args.bad_words, bad_words) if not ids]
        if empty:
            raise GlmEngineError(f"--bad_words {empty[0]!r} has no tokens")
    return {**token_choice(args), "repetition_penalty": args.repetition_penalty,
            "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
            "min_length": args.min_length, "bad_words": bad_words,
            "stop_words": stop_words, "num_beams": args.num_beams, "length_penalty": args.length_penalty,
            "early_stopping": {"false": False, "true": True, "never": "never"}[args.early_stopping],
            "num_return_sequences": args.num_return_sequences}
