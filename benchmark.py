"""Measures an engine, with transformers' GlmForCausalLM (eager) on the same
weights as the baseline of the same run (--hf).

--mode latency (default): start-up, prefill latency, decode latency and
throughput and peak GPU memory at given batch sizes, and the engine's logit
error against GlmForCausalLM in float32 (--accuracy).
--mode throughput: --num_requests requests with input lengths drawn uniformly
from --input_len_range, --output_len tokens each, all submitted at once to the
in-flight batching scheduler; output tokens/s, TTFT and TPOT percentiles. HF
runs static batches of --hf_batch_size on --hf_num_requests of them.
--mode rate: the same requests arriving as a Poisson process of
--request_rate requests/s.
With --server_url, either serving mode sends its requests, streamed, to a serve.py
server instead (open loop: each at its arrival time), timed at the client.

Prints a table; --output_json keeps the numbers with the card, date, command and
versions; --plot draws decode tokens/s against batch size (latency mode)."""

from __future__ import annotations

import argparse
import bisect
import datetime
import functools
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

from typing import TYPE_CHECKING

# Light imports only up here: --help answers without loading torch or transformers;
# each function imports what it measures with.
from glm_engine import GlmEngineError
from glm_engine.tools.cli import (MAX_PROMPT_TOKENS, MAX_PROMPTS, add_kv_cache_arguments, add_sampling_arguments,
                                  add_scheduler_arguments, add_speculative_arguments, kv_cache_options, launched_rank,
                                  run_tool, sampling_options, scheduler_options, speculative_options)
from glm_engine.tools.compare import relative_error
from glm_engine.tools.output_file import check_output_file, output_stream
from glm_engine.text.prompts import random_prompts

if TYPE_CHECKING:
    import torch

    from glm_engine.runtime.sampling import SamplingConfig
    from glm_engine.runtime.session import Session

NEVER_ENDS = -1  # end_id no token equals: every run generates exactly output_len tokens
MIN_REQUEST_RATE = 1e-6  # requests/s; slower arrivals would be spread over decades


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine_dir", type=str, required=True, help="the engine to measure (required)")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[1],
                        help="latency mode: batch sizes to measure (default: 1)")
    parser.add_argument("--input_len", type=int, default=1024,
                        help="latency mode: prompt tokens (default: %(default)s)")
    parser.add_argument("--output_len", type=int, default=128, help="tokens generated (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per measurement, median kept (default: %(default)s)")
    parser.add_argument("--hf", action="store_true",
                        help="also measure GlmForCausalLM (eager) on the same weights (default: off)")
    parser.add_argument("--accuracy", action="store_true",
                        help="relative error of the engine's logits against GlmForCausalLM in float32, from "
                             "the prefill and from decode steps (default: off)")
    parser.add_argument("--reference_engine_dir", type=str, default=None,
                        help="--accuracy: take the float32 reference's weights from this engine (e.g. the "
                             "unquantized one, to see quantization drift) (default: the measured engine's, "
                             "dequantized)")
    parser.add_argument("--no_cuda_graphs", action="store_true",
                        help="run every step eagerly, decode and short prompts too, even with the attention plugin "
                             "(default: off)")
    parser.add_argument("--output_json", type=str, default=None,
                        help="keep the numbers with card, date, command and versions (default: none)")
    parser.add_argument("--plot", type=str, default=None,
                        help="latency mode: PNG of decode tokens/s against batch size (default: none)")
    parser.add_argument("--device", type=str, default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--mode", choices=["latency", "throughput", "rate"], default="latency",
                        help="(default: %(default)s)")
    parser.add_argument("--num_requests", type=int, default=512,
                        help="serving modes: requests (default: %(default)s)")
    parser.add_argument("--input_len_range", type=int, nargs=2, default=[400, 800], metavar=("MIN", "MAX"),
                        help="serving modes: prompt lengths, uniform (default: 400 800)")
    parser.add_argument("--request_rate", type=float, default=None,
                        help="rate mode: requests per second (required there)")
    parser.add_argument("--shared_prefix_len", type=int, default=0,
                        help="serving modes: every prompt starts with the same N random tokens, a system prompt "
                             "(default: %(default)s)")
    parser.add_argument("--turns", type=int, default=1,
                        help="serving modes: the requests are --num_requests / T conversations of T turns; turn t's "
                             "prompt is the shared prefix, the conversation's earlier user texts each followed by "
                             "--output_len fixed answer tokens, then its new user text (--input_len_range); every "
                             "conversation's first turn comes first, then every second turn, ... (default: 1)")
    parser.add_argument("--response_format", type=response_format_argument, default=None, metavar="JSON",
                        help="serving modes: each request's OpenAI response_format, e.g. '{\"type\": \"json_object\"}'; "
                             "a request then ends when its JSON is complete, at most --output_len tokens (needs the "
                             "engine's tokenizer; default: free text)")
    add_scheduler_arguments(parser, "serving modes: ")
    parser.add_argument("--server_url", type=str, default=None,
                        help="serving modes: send the requests, streamed, to the serve.py server at this URL (e.g. "
                             "http://127.0.0.1:8000) instead of running --engine_dir in this process, which then "
                             "only gives the prompts' vocabulary and limits (default: none)")
    parser.add_argument("--hf_batch_size", type=int, default=32,
                        help="serving modes with --hf: HF static batch size (default: %(default)s)")
    parser.add_argument("--hf_num_requests", type=int, default=128,
                        help="serving modes with --hf: requests HF runs (default: %(default)s)")
    add_sampling_arguments(parser, words=False)
    add_kv_cache_arguments(parser)
    add_speculative_arguments(parser)
    return parser.parse_args(argv)


def response_format_argument(text: str) -> dict:
    """--response_format's value: a JSON object (its fields are checked with the first request)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; give one such as '{{\"type\": \"json_object\"}}'")
    return value


def progress(message: str) -> None:
    """A line on stderr as each phase starts (rank 0), since a phase may take minutes."""
    if launched_rank() == 0:
        print(f"benchmark.py: {message}", file=sys.stderr, flush=True)


def progress_bar(total: int, description: str):
    """A tqdm bar on stderr for a phase's runs or requests: shown on a terminal (rank 0),
    silent when stderr is a file or a pipe (the phase's line says it began)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, file=sys.stderr, leave=False,
                disable=None if launched_rank() == 0 else True)


def report_speculation(session: Session, result: dict) -> None:
    """With speculative decoding: its counts in the JSON and one line (drafted and accepted
    tokens, forward steps per generated token)."""
    if session.speculative is None:
        return
    from glm_engine.runtime.drafting import describe

    result["speculative"] = session.scheduler.speculative_counts()
    print(describe(session.speculative.mode, result["speculative"]))


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_runs(run: Callable[[Callable[[], None]], None], batch_size: int, output_len: int, repeats: int) -> dict:
    """Prefill ms (until the first new token is on the host) and decode ms per step
    (the rest, over output_len - 1 steps): medians of `repeats` runs after a warm-up.
    `run(first_token_out)` generates output_len tokens and calls first_token_out once."""
    prefills, decodes = [], []
    with progress_bar(repeats + 1, f"batch {batch_size}, runs") as bar:
        for attempt in range(repeats + 1):
            marks = []
            synchronize()
            start = time.perf_counter()
            run(lambda: marks.append(time.perf_counter()))
            synchronize()
            end = time.perf_counter()
            if attempt:  # attempt 0 warms up
                prefills.append(marks[0] - start)
                decodes.append((end - marks[0]) / max(1, output_len - 1))
            bar.update()
    prefill, decode = statistics.median(prefills), statistics.median(decodes)
    return {"batch_size": batch_size, "prefill_ms": 1000 * prefill, "decode_ms_per_step": 1000 * decode,
            "decode_tokens_per_s": batch_size / decode}


def measure_engine(session: Session, prompts: list[list[int]], output_len: int, repeats: int, options: dict) -> dict:
    """The engine's token stream: each step's tokens reach the host before it is yielded;
    `options`: the sampling flags (sampling_options)."""
    from glm_engine.runtime.sampling import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=output_len, end_id=NEVER_ENDS, **options)

    def run(first_token_out: Callable[[], None]) -> None:
        stream = session.stream(prompts, sampling)
        next(stream)
        first_token_out()
        for _ in stream:
            pass

    return timed_runs(run, len(prompts), output_len, repeats)


def measure_hf(model, prompts: list[list[int]], output_len: int, repeats: int) -> dict:
    """GlmForCausalLM.generate (greedy, exactly output_len tokens), timed like the engine."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenStreamer(BaseStreamer):
        """Calls back when generate() pushes its first new tokens (the prompt comes first)."""

        def __init__(self, first_token_out: Callable[[], None]) -> None:
            self.first_token_out = first_token_out
            self.pushes = 0

        def put(self, value: torch.Tensor) -> None:
            self.pushes += 1
            if self.pushes == 2:
                value.cpu()  # waits for the token, as the engine's stream does
                self.first_token_out()

        def end(self) -> None:
            pass

    input_ids = torch.tensor(prompts, device=next(model.parameters()).device)

    @torch.inference_mode()
    def run(first_token_out: Callable[[], None]) -> None:
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                       max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0, top_k=None,
                       top_p=None, temperature=None, streamer=FirstTokenStreamer(first_token_out))

    return timed_runs(run, len(prompts), output_len, repeats)


def environment(device: torch.device) -> dict:
    import torch
    import transformers

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"card": card, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def gib_text(value: float | None) -> str:
    """A peak memory as printed: GiB, or "n/a" where it is not measured (the CPU)."""
    return "n/a" if value is None else f"{value:.2f}"


def print_table(rows: list[dict]) -> None:
    print(f"{'side':<14}{'batch':>6}{'prefill ms':>12}{'decode ms/step':>16}{'tok/s':>10}{'peak GiB':>10}")
    for row in rows:
        print(f"{row['side']:<14}{row['batch_size']:>6}{row['prefill_ms']:>12.2f}"
              f"{row['decode_ms_per_step']:>16.2f}{row['decode_tokens_per_s']:>10.1f}{gib_text(row['peak_gib']):>10}")
    if any(row["peak_gib"] is None for row in rows):
        print("peak GiB: n/a, not measured on the CPU (CUDA's allocator counts it on a GPU)")


def peak_gib(device: torch.device) -> float | None:
    """The GPU memory allocated at most since reset_peak, in GiB; None on the CPU."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    """Frees what earlier measurements left (reference cycles included) and restarts the peak."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measured_rows(side: str, measure: Callable[[list[list[int]]], dict], vocab_size: int,
                  args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One row per batch size: `measure(prompts)` timings and the peak memory during them."""
    rows = []
    for batch_size in args.batch_size:
        runs = f"{args.repeats} timed run{'s' if args.repeats != 1 else ''}"
        progress(f"{side}, batch {batch_size}: a warm-up and {runs} of {args.input_len} prompt and {args.output_len} "
                 "new tokens")
        reset_peak(device)
        row = measure(random_prompts([args.input_len] * batch_size, min(vocab_size, 60000), seed=0))
        rows.append({"side": side, **row, "peak_gib": peak_gib(device)})
    return rows


def hf_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """GlmForCausalLM, eager attention, in the engine's dtype and with its weights."""
    from glm_engine.engine_format.engine import load_whole_engine
    from glm_engine.tools.hf_reference import build_glm_model

    progress("loading GlmForCausalLM (Hugging Face, eager) with the engine's weights")
    engine = load_whole_engine(args.engine_dir, "cpu")
    model = build_glm_model(engine.model_config, engine.weights, device, attn_implementation="eager")
    del engine
    return measured_rows("hf_eager", lambda prompts: measure_hf(model, prompts, args.output_len, args.repeats),
                         model.config.vocab_size, args, device)


DECODED_POSITIONS = 32  # --accuracy: the prompt's last positions also computed by decode steps


def accuracy(session: Session, args: argparse.Namespace, device: torch.device) -> dict[str, float] | None:
    """||engine - reference|| / ||reference|| of the logits of one prompt, the reference
    being GlmForCausalLM in float32: at every position from the prefill ("prefill"), and
    at its last positions from decode steps fed the prompt's tokens ("decode": the decode
    kernels and graphs). Built on rank 0 alone; None on the other ranks, which take part
    in the engine's forwards only."""
    import torch

    from glm_engine.engine_format.engine import load_whole_engine
    from glm_engine.tools.hf_reference import build_glm_model

    progress("--accuracy: the engine's logits against GlmForCausalLM in float32")
    prompt = random_prompts([min(args.input_len, 256)], min(session.model_config.vocab_size, 60000), seed=1)[0]
    decoded = min(DECODED_POSITIONS, len(prompt) - 1)  # none for a one-token prompt
    prefill = session.prompt_logits(prompt)
    decode = session.decode_logits(prompt, decoded) if decoded else None
    if not session.is_main_rank:
        return None
    engine = load_whole_engine(args.reference_engine_dir or args.engine_dir, "cpu")  # shape checked up front
    hf_fp32 = build_glm_model(session.model_config, engine.weights, device, torch.float32, attn_implementation="eager")
    del engine
    with torch.inference_mode():
        reference = hf_fp32(torch.tensor([prompt], device=prefill.device)).logits[0]
    return {"prefill": relative_error(prefill, reference),
            "decode": None if decode is None else relative_error(decode, reference[-decoded:])}


def plot_throughput(rows: list[dict], environment: dict, path: str) -> None:
    """Decode tokens/s against batch size, one line per side, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for side in dict.fromkeys(row["side"] for row in rows):
        points = [(row["batch_size"], row["decode_tokens_per_s"]) for row in rows if row["side"] == side]
        axes.plot(*zip(*points), marker="o", label=side)
    axes.set_xlabel("batch size")
    axes.set_ylabel("decode tokens/s")
    axes.set_title(f"{environment['card']}, {environment['date']}", fontsize=9)
    axes.legend()
    figure.tight_layout()
    with output_stream(path, "--plot", binary=True) as stream:
        figure.savefig(stream, format="png", dpi=120)
    pyplot.close(figure)


def serving_requests(args: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    """--num_requests seeded random prompts: user texts of lengths uniform over
    --input_len_range, after --shared_prefix_len common tokens and, with --turns, after
    the conversation's earlier turns (see --turns)."""
    import torch

    low, high = args.input_len_range
    progress(f"making {args.num_requests} prompts of {low} to {high} new tokens")
    lengths = torch.randint(low, high + 1, (args.num_requests,), generator=torch.Generator().manual_seed(0)).tolist()
    user_texts = random_prompts(lengths, min(vocab_size, 60000), seed=1)
    if args.shared_prefix_len == 0 and args.turns == 1:
        return user_texts
    system, *answers = random_prompts([args.shared_prefix_len] + [args.output_len] * args.num_requests,
                                      min(vocab_size, 60000), seed=2)
    conversations = args.num_requests // args.turns
    prompts = []
    for index, user_text in enumerate(user_texts):  # turn-major: request index = turn * conversations + conversation
        history = list(system)
        for earlier in range(index % conversations, index, conversations):
            history += user_texts[earlier] + answers[earlier]
        prompts.append(history + user_text)
    return prompts


def longest_prompt(args: argparse.Namespace) -> int:
    """The most tokens a serving-mode prompt can have."""
    return args.shared_prefix_len + args.turns * args.input_len_range[1] + (args.turns - 1) * args.output_len


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda share: ordered[min(len(ordered) - 1, int(share * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99), "mean": statistics.fmean(ordered)}


def arrival_times(args: argparse.Namespace, count: int) -> list[float]:
    """Seconds after the start at which each request arrives: all at once, or (rate mode)
    a seeded Poisson process of --request_rate."""
    import torch

    if args.mode != "rate":
        return [0.0] * count
    uniform = torch.rand(count, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return torch.cumsum(-torch.log1p(-uniform) / args.request_rate, 0).tolist()  # exponential gaps


def http_sampling(args: argparse.Namespace) -> dict:
    """The request fields of the sampling flags: OpenAI's, and vLLM's top_k and
    repetition_penalty (the load generator sets min_tokens itself; beams are not sent)."""
    options = sampling_options(args, None)
    unsupported = [flag for flag, value, plain in (("--min_length", args.min_length, 0),
                                                   ("--num_beams", args.num_beams, 1),
                                                   ("--enable_prefix_caching", args.enable_prefix_caching, False))
                   if value != plain]
    if unsupported:
        raise GlmEngineError(f"{unsupported[0]} is not sent over HTTP (the server's own flags choose prefix caching); "
                             "drop it with --server_url")
    fields = {"presence_penalty": options["presence_penalty"], "frequency_penalty": options["frequency_penalty"],
              "repetition_penalty": options["repetition_penalty"]}
    if args.response_format is not None:
        fields["response_format"] = args.response_format
    if options["top_k"] == 1:
        return {**fields, "temperature": 0.0}
    return {**fields, "temperature": options["temperature"], "top_k": options["top_k"],
            "top_p": options["top_p"] if 0 < options["top_p"] < 1 else 1.0}


def serve_over_http(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """--server_url: the same requests and arrivals, sent to a server (glm_engine/serving/load_generator.py)."""
    from glm_engine.serving.load_generator import run_http_load

    progress(f"sending {len(prompts)} requests to {args.server_url} ({args.mode} mode)")
    results, elapsed = run_http_load(args.server_url, prompts, arrival_times(args, len(prompts)), args.output_len,
                                     http_sampling(args))
    produced = sum(result["tokens"] for result in results)
    if not all_lengths_right([result["tokens"] for result in results], args):
        raise GlmEngineError(f"the server returned {produced} tokens, not {len(prompts)} x {args.output_len}")
    return {"side": "serve.py over HTTP", "requests": len(prompts), "seconds": elapsed, "output_tokens": produced,
            "output_tokens_per_s": produced / elapsed, "ttft_s": percentiles([r["ttft"] for r in results]),
            "tpot_s": percentiles([r["tpot"] for r in results])}


def all_lengths_right(produced: list[int], args: argparse.Namespace) -> bool:
    """Each request got --output_len tokens (with --response_format: 1 to --output_len, as
    a complete JSON text ends it)."""
    if args.response_format is None:
        return all(count == args.output_len for count in produced)
    return all(1 <= count <= args.output_len for count in produced)


def serving_sampling(args: argparse.Namespace) -> SamplingConfig:
    """The serving modes' requests' sampling: exactly --output_len tokens (fewer only where
    --response_format's JSON is complete), the sampling flags."""
    from glm_engine.runtime.sampling import SamplingConfig

    return SamplingConfig(max_new_tokens=args.output_len, end_id=NEVER_ENDS, response_format=args.response_format,
                          **sampling_options(args, None))


def run_serving(session: Session, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """Adds the requests to the session (all at once, or at Poisson arrival times), steps
    it and records when each one's tokens reach the host."""
    sampling = serving_sampling(args)
    # Where the time goes: steps that carry prompt tokens, and decode-only steps.
    split = {"prefill_steps": {"count": 0, "seconds": 0.0, "tokens": 0},
             "decode_steps": {"count": 0, "seconds": 0.0, "tokens": 0}}
    arrivals = arrival_times(args, len(prompts))
    first_token, finish, produced = [None] * len(prompts), [None] * len(prompts), [0] * len(prompts)
    submitted = steps = 0
    bar = progress_bar(len(prompts), "requests finished")
    synchronize()
    start = time.perf_counter()
    while submitted < len(prompts) or session.has_work:
        now = time.perf_counter() - start
        arrived = bisect.bisect_right(arrivals, now)
        if args.mode == "rate":  # arrivals follow rank 0's clock, so that every rank plans the same steps
            arrived = session.parallel.rank0_value(arrived)
        for index in range(submitted, arrived):
            session.add_request(prompts[index], sampling, index)
        submitted = arrived
        if not session.has_work:
            time.sleep(max(0.0, arrivals[submitted] - now))
            continue
        step = session.step()
        steps += 1
        before, now = now, time.perf_counter() - start
        kind = split["decode_steps" if step.forwarded_tokens == step.sequences else "prefill_steps"]
        kind["count"] += 1
        kind["seconds"] += now - before
        kind["tokens"] += step.forwarded_tokens
        for index, _ in step.tokens:
            produced[index] += 1
            if first_token[index] is None:
                first_token[index] = now
        for index in step.finished:
            finish[index] = now
        bar.update(len(step.finished))
    elapsed = time.perf_counter() - start
    bar.close()
    if None in finish or not all_lengths_right(produced, args):
        raise GlmEngineError("a request was lost or cut short")  # the scheduler's contract
    ttft = [first - arrival for first, arrival in zip(first_token, arrivals)]
    tpot = [(end - first) / max(1, count - 1) for end, first, count in zip(finish, first_token, produced)]
    manager = session.block_manager
    return {"side": "glm_engine", "requests": len(prompts), "seconds": elapsed, "output_tokens": sum(produced),
            "output_tokens_per_s": sum(produced) / elapsed, "steps": steps,
            "preemptions": session.scheduler.preemptions,
            "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
            "prefix_cache_hit_tokens": manager.hit_tokens, "prompt_tokens": sum(map(len, prompts)),
            "kv_pool_tokens": manager.num_blocks * manager.block_size, "blocks_free_at_end": manager.free_blocks,
            "blocks_total": manager.num_blocks, **split}


def hf_static_throughput(args: argparse.Namespace, prompts: list[list[int]], device: torch.device) -> dict:
    """GlmForCausalLM.generate on static batches of --hf_batch_size (left-padded),
    exactly --output_len new tokens each, over the first --hf_num_requests prompts."""
    import torch
    
    from glm_engine.engine_format.engine import load_whole_engine
    from glm_engine.tools.hf_reference import build_glm_model, left_padded

    chosen = prompts[:args.hf_num_requests]
    progress(f"GlmForCausalLM (Hugging Face, eager): {len(chosen)} requests in static batches of {args.hf_batch_size}")
    engine = load_whole_engine(args.engine_dir, "cpu")
    model = build_glm_model(engine.model_config, engine.weights, device, attn_implementation="eager")
    del engine
    synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(chosen), args.hf_batch_size):
            batch = chosen[first:first + args.hf_batch_size]
            input_ids, mask = left_padded(batch, 0, device)
            model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=args.output_len,
                           min_new_tokens=args.output_len, pad_token_id=0, top_k=None, top_p=None,
                           temperature=None)
    synchronize()
    elapsed = time.perf_counter() - start
    return {"side": "hf_eager_static", "requests": len(chosen), "batch_size": args.hf_batch_size,
            "seconds": elapsed, "output_tokens_per_s": len(chosen) * args.output_len / elapsed}


def serving_main(args: argparse.Namespace, device: torch.device, result: dict) -> None:
    """--mode throughput / rate."""
    from model import load_session

    if args.server_url is not None:
        from glm_engine.engine_format.engine import engine_configs

        prompts = serving_requests(args, engine_configs(args.engine_dir)[0].vocab_size)
        result.update(num_requests=args.num_requests, input_len_range=args.input_len_range,
                      request_rate=args.request_rate, mode=args.mode, server_url=args.server_url)
        result["rows"] = [serve_over_http(args, prompts)]
        row = result["rows"][0]
        print(f"{row['side']:<18} {row['requests']:>5} requests in {row['seconds']:8.2f} s: "
              f"{row['output_tokens_per_s']:9.1f} output tok/s; TTFT p50 {row['ttft_s']['p50'] * 1e3:.0f} ms "
              f"p99 {row['ttft_s']['p99'] * 1e3:.0f} ms, TPOT p50 {row['tpot_s']['p50'] * 1e3:.1f} ms "
              f"p99 {row['tpot_s']['p99'] * 1e3:.1f} ms (at the client)")
        return

    progress(f"loading the engine {args.engine_dir}")
    session = load_session(args.engine_dir, device, cuda_graphs=not args.no_cuda_graphs, **kv_cache_options(args),
                           **speculative_options(args), **scheduler_options(args))
    result["cuda_graphs"] = session.runner.decode_graphs is not None
    result["prompt_graphs"] = session.runner.prompt_graphs is not None
    prompts = serving_requests(args, session.model_config.vocab_size)
    sampling = serving_sampling(args)
    for index, prompt in enumerate(prompts):  # refuse before any work (any number of requests: not a static batch)
        session.limits.check(prompt, sampling, index)
    result.update(num_requests=args.num_requests, input_len_range=args.input_len_range,
                  request_rate=args.request_rate, mode=args.mode)
    reset_peak(device)
    progress(f"serving {len(prompts)} requests ({args.mode} mode)")
    rows = [run_serving(session, prompts, args)]
    rows[0]["peak_gib"] = peak_gib(device)
    if not session.is_main_rank:  # tensor parallelism: rank 0 alone runs the reference and reports
        return
    report_speculation(session, result)
    del session
    if args.hf:
        reset_peak(device)
        rows.append(hf_static_throughput(args, prompts, device))
        rows[-1]["peak_gib"] = peak_gib(device)
    result["rows"] = rows
    for row in rows:
        line = (f"{row['side']:<16} {row['requests']:>5} requests in {row['seconds']:8.2f} s: "
                f"{row['output_tokens_per_s']:9.1f} output tok/s, peak {gib_text(row['peak_gib'])} GiB")
        if args.response_format is not None and "output_tokens" in row:
            line += f", {row['output_tokens'] / row['requests']:.1f} tokens a request"
        if "ttft_s" in row:
            line += (f"; TTFT p50 {row['ttft_s']['p50'] * 1e3:.0f} ms p99 {row['ttft_s']['p99'] * 1e3:.0f} ms, "
                     f"TPOT p50 {row['tpot_s']['p50'] * 1e3:.1f} ms p99 {row['tpot_s']['p99'] * 1e3:.1f} ms, "
                     f"{row['preemptions']} preemptions, {row['prefix_cache_hit_tokens']} of {row['prompt_tokens']} "
                     f"prompt tokens from the prefix cache, KV pool {row['kv_pool_tokens']} tokens, "
                     f"{row['blocks_free_at_end']}/{row['blocks_total']} blocks free at the end")
            for kind in ("prefill_steps", "decode_steps"):
                part = row[kind]
                line += (f"\n  {kind}: {part['count']} steps, {part['seconds']:.2f} s, {part['tokens']} tokens "
                         f"({part['tokens'] / max(part['seconds'], 1e-9):.0f} tok/s)")
        print(line)


def check_arguments(args: argparse.Namespace) -> None:
    """Every flag checked before any measurement, against the engine's limits too."""
    from glm_engine.engine_format.engine import engine_configs

    counts = {"--input_len": args.input_len, "--output_len": args.output_len, "--repeats": args.repeats,
              "--num_requests": args.num_requests, "--hf_batch_size": args.hf_batch_size,
              "--hf_num_requests": args.hf_num_requests, "--max_in_flight": args.max_in_flight,
              "--max_tokens_per_step": args.max_tokens_per_step,
              **{"--batch_size": size for size in args.batch_size if size < 1}}
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise GlmEngineError(f"{flag} must be at least 1, got {value}")
    from glm_engine.runtime.sampling import SamplingConfig

    SamplingConfig(max_new_tokens=1, **sampling_options(args, None))  # the sampling flags' values
    if args.num_return_sequences != 1:
        raise GlmEngineError("--num_return_sequences chooses how many beams are returned, which changes no "
                             "measurement; drop it")
    if args.mode == "latency" and args.num_beams > 1:
        raise GlmEngineError("--num_beams: beams are known only when the search ends, so latency mode's split "
                             "into prefill and decode time does not apply; use --mode throughput or rate")
    low, high = args.input_len_range
    if not 1 <= low <= high:
        raise GlmEngineError(f"--input_len_range {low} {high}: need 1 <= MIN <= MAX")
    if args.shared_prefix_len < 0 or args.turns < 1 or args.num_requests % args.turns:
        raise GlmEngineError(f"--shared_prefix_len {args.shared_prefix_len} --turns {args.turns}: need a length of at "
                             "least 0 and a number of turns of at least 1 that divides --num_requests")
    if args.mode == "latency" and (args.shared_prefix_len or args.turns > 1 or args.response_format is not None):
        raise GlmEngineError("--shared_prefix_len, --turns and --response_format shape the serving modes' requests; "
                             "add --mode throughput or rate")
    if args.response_format is not None and args.hf:
        raise GlmEngineError("--response_format: the HF baseline has no grammar; drop --hf")
    if args.mode != "latency" and (args.num_requests > MAX_PROMPTS
                                   or args.num_requests * longest_prompt(args) > MAX_PROMPT_TOKENS):
        raise GlmEngineError(f"--num_requests {args.num_requests} of up to {high} prompt tokens is more than one run "
                             f"holds ({MAX_PROMPTS} requests, {MAX_PROMPT_TOKENS} prompt tokens); use fewer requests "
                             "or shorter prompts")
    if args.mode == "rate" and (args.request_rate is None or not MIN_REQUEST_RATE <= args.request_rate < math.inf):
        raise GlmEngineError(f"--mode rate needs a finite --request_rate of at least {MIN_REQUEST_RATE} "
                             f"requests/s, got {args.request_rate}")
    if args.mode != "rate" and args.request_rate is not None:
        raise GlmEngineError("--request_rate sets the arrival rate of --mode rate; add --mode rate or drop it")
    if args.reference_engine_dir and not args.accuracy:
        raise GlmEngineError("--reference_engine_dir sets the weights of --accuracy's reference; add --accuracy")
    if args.server_url is not None and (args.mode == "latency" or args.hf):
        raise GlmEngineError("--server_url measures a server in --mode throughput or rate, without --hf")
    scheduling = [flag for flag, value in (("--max_in_flight", args.max_in_flight),
                                           ("--max_tokens_per_step", args.max_tokens_per_step),
                                           ("--enable_chunked_context", args.enable_chunked_context or None))
                  if value is not None]
    if scheduling and args.mode == "latency":
        raise GlmEngineError(f"{scheduling[0]} sets the serving modes' scheduler; add --mode throughput or rate")
    if scheduling and args.server_url is not None:
        raise GlmEngineError(f"{scheduling[0]} sets the in-process scheduler; pass it to serve.py instead")
    speculative_options(args)  # its flags checked before any work
    if args.speculative_decoding_mode is not None and args.server_url is not None:
        raise GlmEngineError("--speculative_decoding_mode sets the in-process engine; pass it to serve.py instead")
    if args.mode != "latency" and (args.plot is not None or args.accuracy):
        raise GlmEngineError(f"--{'accuracy' if args.accuracy else 'plot'} applies to --mode latency")
    for flag, path in (("--output_json", args.output_json), ("--plot", args.plot)):
        if path is not None:
            check_output_file(path, flag)
    model_config, build = engine_configs(args.engine_dir)
    if args.reference_engine_dir and engine_configs(args.reference_engine_dir)[0] != model_config:
        raise GlmEngineError(f"--reference_engine_dir {args.reference_engine_dir} holds another model shape; "
                             "give an engine built from the same weights")
    longest = args.input_len if args.mode == "latency" else high
    limits = [("--output_len", args.output_len, build.max_output_len, "max_output_len"),
              ("--input_len" if args.mode == "latency" else "--input_len_range MAX", longest, build.max_input_len,
               "max_input_len")]
    if args.mode == "latency":
        limits.append(("--batch_size", max(args.batch_size), build.max_batch_size, "max_batch_size"))
    for flag, value, limit, name in limits:
        if value > limit:
            raise GlmEngineError(f"{flag} {value} exceeds the engine's {name} {limit}")


def write_json(result: dict, path: str) -> None:
    with output_stream(path, "--output_json") as stream:
        json.dump(result, stream, indent=2)


def main() -> None:
    args = parse_arguments()
    from glm_engine.engine_format.engine import read_engine_config
    from glm_engine.runtime.session import resolve_device
    from model import load_session

    device = resolve_device(args.device)
    check_arguments(args)
    result = {"environment": environment(device), "engine_dir": args.engine_dir,
              "build": read_engine_config(args.engine_dir)["build"], "input_len": args.input_len,
              "output_len": args.output_len}
    if args.mode != "latency":
        serving_main(args, device, result)
        if args.output_json is not None and launched_rank() == 0:
            write_json(result, args.output_json)
        return
    progress(f"loading the engine {args.engine_dir}")
    synchronize()
    start = time.perf_counter()
    session = load_session(args.engine_dir, device, cuda_graphs=not args.no_cuda_graphs, **kv_cache_options(args),
                           **speculative_options(args))
    synchronize()
    result["startup_s"] = time.perf_counter() - start
    result["startup_stages_s"] = session.startup_seconds
    result["cuda_graphs"] = session.runner.decode_graphs is not None  # what ran, not what was allowed
    result["prompt_graphs"] = session.runner.prompt_graphs is not None
    measure = functools.partial(measure_engine, session, output_len=args.output_len, repeats=args.repeats,
                                options=sampling_options(args, None))
    rows = measured_rows("glm_engine", measure, session.model_config.vocab_size, args, device)
    if args.accuracy:
        errors = accuracy(session, args, device)
        if errors is not None:
            result["logits_relative_error_vs_hf_fp32"] = errors["prefill"]
            result["decode_logits_relative_error_vs_hf_fp32"] = errors["decode"]
        result["accuracy_reference_engine_dir"] = args.reference_engine_dir or args.engine_dir
    if not session.is_main_rank:  # tensor parallelism: rank 0 alone runs the reference and reports
        return
    report_speculation(session, result)
    session_stages = session.startup_seconds
    del session, measure  # `measure` holds the session too: free its weights before HF loads
    reset_peak(device)
    if args.hf:
        rows += hf_rows(args, device)
    result["rows"] = rows
    print_table(rows)
    stages = ", ".join(f"{name} {seconds:.2f}" for name, seconds in session_stages.items())
    print(f"start-up {result['startup_s']:.2f} s ({stages})")
    if args.accuracy:
        decode = result["decode_logits_relative_error_vs_hf_fp32"]
        print(f"logits relative error vs GlmForCausalLM fp32: prefill {result['logits_relative_error_vs_hf_fp32']:.3e}"
              f", decode steps {'n/a (one-token prompt)' if decode is None else f'{decode:.3e}'}")
    if args.plot is not None:
        plot_throughput(rows, result["environment"], args.plot)
    if args.output_json is not None:
        write_json(result, args.output_json)


if __name__ == "__main__":
    run_tool(main, writes_stdout=True)
