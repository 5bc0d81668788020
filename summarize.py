"""Summarizes cnn_dailymail articles with the engine and, with --test_hf, with
the Hugging Face model; reports ROUGE, latency and how often the two agree
token for token (TensorRT-LLM's summarize.py flags and output)."""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

# Light imports only up here: --help answers without loading torch or transformers;
# the functions import the rest.
from glm_engine.tools.cli import missing_package  # the standard library only: imports in any Python

try:
    from tqdm import tqdm

    from glm_engine import GlmEngineError
    from glm_engine.tools.cli import (add_session_arguments, kv_cache_options, launched_rank, run_tool, setup_logging,
                                      speculative_options)
    from glm_engine.tools.compare import first_divergence
    from glm_engine.config import ModelConfig
    from glm_engine.text.dataset import load_articles
    from glm_engine.text.tokenizer import ChatGLMTokenizer, has_tokenizer
    from glm_engine.text.tokenizer import load_tokenizer as load_tokenizer_dir
except ModuleNotFoundError as error:
    missing_package(error)

logger = logging.getLogger("summarize")

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
HF_DTYPES = {"fp16": "float16", "fp32": "float32"}  # --data_type -> torch dtype name


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine_dir", type=str, default="trtModel", help="the engine (default: %(default)s)")
    parser.add_argument("--hf_model_location", type=str, default=None,
                        help="Hugging Face checkpoint for --test_hf (default: GlmForCausalLM with the engine's "
                             "own weights)")
    parser.add_argument("--tokenizer", type=str, default=None,
                        help="tokenizer directory (default: --hf_model_location, else the engine directory)")
    parser.add_argument("--test_hf", action="store_true", help="also summarize with Hugging Face (default: off)")
    parser.add_argument("--test_trt_llm", "--test_engine", dest="test_engine", action="store_true", default=True,
                        help="summarize with the engine (default: on)")
    parser.add_argument("--no_test_trt_llm", "--no_test_engine", dest="test_engine", action="store_false",
                        help="do not run the engine (with --test_hf)")
    parser.add_argument("--data_type", choices=list(HF_DTYPES), default="fp16",
                        help="Hugging Face side dtype (default: %(default)s)")
    parser.add_argument("--dataset_path", type=str, default=None,
                        help="local cnn_dailymail file (json/jsonl/csv/parquet) or save_to_disk directory "
                             "(default: ccdv/cnn_dailymail 3.0.0 from the hub)")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="articles per batch; in-flight engines: articles in flight (default: %(default)s)")
    parser.add_argument("--max_ite", type=int, default=20, help="batches (default: %(default)s)")
    parser.add_argument("--num_beams", type=int, default=1,
                        help="beam search with N beams on both sides, the best beam scored (default: %(default)s)")
    parser.add_argument("--output_len", type=int, default=100, help="tokens per summary (default: %(default)s)")
    parser.add_argument("--max_input_len", type=int, default=800,
                        help="prompt tokens kept per article (default: %(default)s)")
    parser.add_argument("--check_accuracy", action="store_true",
                        help="fail when the engine's ROUGE-1 is below the threshold (default: off)")
    parser.add_argument("--tensorrt_llm_rouge1_threshold", "--rouge1_threshold", dest="rouge1_threshold",
                        type=float, default=15.0, help="(default: %(default)s)")
    parser.add_argument("--hf_trust_remote_code", action="store_true",
                        help="run the checkpoint's own modeling code for the HF side instead of GlmForCausalLM "
                             "(default: off)")
    add_session_arguments(parser)
    return parser.parse_args(argv)


def summarize_prompt(article: str, tokenizer: ChatGLMTokenizer, max_input_len: int) -> list[int]:
    """`article TL;DR:` (stripped, " n't" -> "n't"), keeping its last tokens so that
    the prompt with its `[gMASK] sop` prefix fits in max_input_len."""
    text = (article + " TL;DR: ").strip().replace(" n't", "n't")
    prefix = tokenizer.encode("", add_prefix=True)
    body = tokenizer.encode(text, add_prefix=False)
    return prefix + body[-(max_input_len - len(prefix)):]


@dataclass
class SideResult:
    """One side's outputs (ids and text) and its generation time."""

    name: str
    output_ids: list[list[int]] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)
    seconds: float = 0.0


def rouge_scores(summaries: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measure x 100 over the articles (rouge_score, stemming on)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for summary, reference in zip(summaries, references):
        for key, score in scorer.score(reference, summary).items():
            totals[key] += score.fmeasure
    return {key: 100.0 * total / len(summaries) for key, total in totals.items()}


def agreement(first: list[list[int]], second: list[list[int]]) -> tuple[float, float | None]:
    """Exact-match rate of two sides' outputs, and the mean index of the first
    differing token over the outputs that differ (None when all match)."""
    divergences = [first_divergence(a, b) for a, b in zip(first, second) if a != b]
    exact = 1.0 - len(divergences) / len(first)
    return exact, (sum(divergences) / len(divergences) if divergences else None)


def run_side(side: SideResult, generate, batches: list[list[list[int]]], tokenizer: ChatGLMTokenizer) -> None:
    """Generates every batch with `generate`, timing only the generation."""
    import torch

    for prompts in tqdm(batches, desc=f"{side.name} summarizing", unit="batch", disable=launched_rank() > 0):
        start = time.perf_counter()
        outputs = generate(prompts)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        side.seconds += time.perf_counter() - start
        side.output_ids += outputs
        side.summaries += [tokenizer.decode(ids).strip() for ids in outputs]


def load_tokenizer(args: argparse.Namespace) -> ChatGLMTokenizer:
    candidates = [args.tokenizer] if args.tokenizer else [args.hf_model_location, args.engine_dir]
    for directory in filter(None, candidates):
        if has_tokenizer(directory):
            return load_tokenizer_dir(directory)
    where = " or ".join(filter(None, candidates))
    raise GlmEngineError(f"no tokenizer.model or tokenizer.json in {where}; pass --tokenizer")


def hf_model(args: argparse.Namespace, device):
    """The Hugging Face side: the checkpoint given, or GlmForCausalLM with the engine's weights."""
    import torch

    from glm_engine.engine_format.engine import load_whole_engine, read_engine_config
    from glm_engine.tools.hf_reference import build_glm_model
    from weight import load_hf_model

    dtype = getattr(torch, HF_DTYPES[args.data_type])
    if args.hf_model_location:
        model_config = ModelConfig.from_dict(read_engine_config(args.engine_dir)["model"])
        return load_hf_model(args.hf_model_location, dtype, device, model_config, args.hf_trust_remote_code)
    engine = load_whole_engine(args.engine_dir, "cpu")
    logger.info("no --hf_model_location: the Hugging Face side is GlmForCausalLM with the engine's weights")
    return build_glm_model(engine.model_config, engine.weights, device, dtype)


def print_side(side: SideResult, references: list[str]) -> dict[str, float]:
    scores = rouge_scores(side.summaries, references)
    tokens = sum(map(len, side.output_ids))
    print(f"{side.name} (total latency: {side.seconds:.3f} sec)")
    print(f"{side.name} (total output tokens: {tokens})")
    print(f"{side.name} (tokens per second: {tokens / side.seconds:.1f})")
    for key in ROUGE_KEYS:
        print(f"  {key} : {scores[key]:.4f}")
    return scores


def main() -> None:
    args = parse_arguments()
    setup_logging(args.log_level)
    from glm_engine.engine_format.engine import read_engine_config
    from glm_engine.tools.hf_reference import hf_generate
    from glm_engine.runtime.sampling import SamplingConfig
    from glm_engine.runtime.session import resolve_device
    from model import load_session

    if not (args.test_engine or args.test_hf):
        raise GlmEngineError("nothing to test: --no_test_trt_llm without --test_hf")
    if args.check_accuracy and not args.test_engine:
        raise GlmEngineError("--check_accuracy checks the engine's ROUGE; drop --no_test_trt_llm")
    if args.batch_size < 1 or args.max_ite < 1 or args.output_len < 1 or args.num_beams < 1 \
            or args.max_input_len < 3:
        raise GlmEngineError("--batch_size, --max_ite, --output_len and --num_beams must be positive, "
                             "--max_input_len >= 3")
    if not math.isfinite(args.rouge1_threshold):
        raise GlmEngineError(f"--rouge1_threshold must be a finite number, got {args.rouge1_threshold}")
    if args.hf_model_location is not None and not Path(args.hf_model_location).is_dir():
        raise GlmEngineError(f"--hf_model_location {args.hf_model_location} is not a directory; point it at the "
                             "Hugging Face checkpoint the engine was built from")
    if args.hf_trust_remote_code and not args.hf_model_location:
        raise GlmEngineError("--hf_trust_remote_code runs a checkpoint's own code: it needs --hf_model_location")
    device = resolve_device(args.device)
    read_engine_config(args.engine_dir)  # a clear error before any other work
    tokenizer = load_tokenizer(args)
    records = load_articles(args.dataset_path)[: args.batch_size * args.max_ite]
    prompts = [summarize_prompt(r["article"], tokenizer, args.max_input_len) for r in records]
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    references = [r["highlights"] for r in records]
    sides = []
    if args.test_engine:
        session = load_session(args.engine_dir, device, **kv_cache_options(args), **speculative_options(args))
        sampling = SamplingConfig(max_new_tokens=args.output_len, num_beams=args.num_beams,
                                  **session.model_config.end_options(args.num_beams))
        for batch in batches:  # every batch checked before the first is generated
            session.check_requests(batch, sampling)
        inflight = session.build_config.use_inflight_batching
        if inflight:  # all articles queued, batch_size in flight
            session.configure_scheduler(max_in_flight=args.batch_size * args.num_beams)
        sides.append(SideResult("glm_engine"))
        run_side(sides[-1], lambda batch: [output.token_ids for output in session.generate(batch, sampling)],
                 [prompts] if inflight else batches, tokenizer)
        if not session.is_main_rank:  # tensor parallelism: rank 0 alone runs the reference and scores
            return
        if session.speculative is not None:
            from glm_engine.runtime.drafting import describe

            print(describe(session.speculative.mode, session.scheduler.speculative_counts()))
        del session
    if args.test_hf:
        model = hf_model(args, device)
        end_id, pad_id = model.config.eos_token_id, model.config.pad_token_id  # every end id of the model
        sides.append(SideResult("Hugging Face"))
        run_side(sides[-1], lambda batch: hf_generate(model, batch, args.output_len, end_id, pad_id, args.num_beams),
                 batches, tokenizer)
    scores = [print_side(side, references) for side in sides]
    if len(sides) == 2:
        exact, divergence = agreement(sides[0].output_ids, sides[1].output_ids)
        where = "n/a" if divergence is None else f"{divergence:.1f}"
        print(f"Token agreement: {100 * exact:.1f}% of outputs identical; mean first divergence at token {where}")
    if args.check_accuracy:
        if scores[0]["rouge1"] < args.rouge1_threshold:
            raise GlmEngineError(f"accuracy check failed: rouge1 {scores[0]['rouge1']:.4f} < threshold "
                                 f"{args.rouge1_threshold}")
        print(f"accuracy check passed: rouge1 {scores[0]['rouge1']:.4f} >= {args.rouge1_threshold}")


if __name__ == "__main__":
    run_tool(main, writes_stdout=True)
