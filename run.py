"""Generates text with an engine for one or more prompts (TensorRT-LLM's
ChatGLM2-6B run.py flags and output). Engines built with --use_inflight_batching
take any number of prompts, max_batch_size of them in flight at a time."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glm_engine import GlmEngineError
from glm_engine.cli import LOG_LEVELS, add_kv_cache_arguments, kv_cache_options, run_tool, setup_logging
from glm_engine.engine import engine_configs
from glm_engine.output_file import check_output_file
from glm_engine.prompts import clean_response, read_token_csv, write_token_csv
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.session import Session, resolve_device
from glm_engine.tokenizer import ChatGLMTokenizer
from model import load_session

DEFAULT_INPUT_TEXT = "续写：北京市教育资源丰富"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine_dir", type=str, default="trtModel")
    parser.add_argument("--tokenizer_dir", type=str, default=None, help="default: the engine directory")
    parser.add_argument("--input_text", type=str, nargs="+", default=None,
                        help=f"prompts (default: {DEFAULT_INPUT_TEXT})")
    parser.add_argument("--input_tokens", type=str, default=None,
                        help="CSV file, one prompt of token ids per line, used exactly as given")
    parser.add_argument("--max_output_len", type=int, default=None, help="default: the engine's")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=1, help="1: greedy")
    parser.add_argument("--top_p", type=float, default=0.0, help="0: no nucleus filter")
    parser.add_argument("--random_seed", type=int, default=None)
    parser.add_argument("--output_csv", type=str, default=None,
                        help="write each prompt's generated ids (end token excluded) as a CSV line")
    parser.add_argument("--streaming", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--device", type=str, default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--log_level", choices=list(LOG_LEVELS), default="error")
    add_kv_cache_arguments(parser)
    return parser.parse_args(argv)


def load_tokenizer(args: argparse.Namespace, required: bool) -> ChatGLMTokenizer | None:
    directory = Path(args.tokenizer_dir or args.engine_dir)
    if not (directory / "tokenizer.model").is_file():
        if required:
            raise GlmEngineError(f"no tokenizer.model in {directory}: pass --tokenizer_dir, or give "
                                 "token ids with --input_tokens")
        return None
    return ChatGLMTokenizer.from_dir(directory)


def stream_outputs(session: Session, prompts: list[list[int]], sampling: SamplingConfig,
                   tokenizer: ChatGLMTokenizer | None) -> list[list[int]]:
    """Generates while printing each prompt's new text (or ids) as it comes."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in session.stream_requests(prompts, [sampling] * len(prompts)):
        for index, token in step.tokens:
            before = tokenizer.decode(outputs[index]) if tokenizer else ""
            outputs[index].append(token)
            piece = tokenizer.decode(outputs[index])[len(before):] if tokenizer else f"{token} "
            prefix = f"[{index}] " if len(prompts) > 1 else ""
            end = "\n" if len(prompts) > 1 else ""
            print(f"{prefix}{piece}", end=end, flush=True)
    print()
    return outputs


def main() -> None:
    args = parse_arguments()
    setup_logging(args.log_level)
    if args.input_tokens is not None and args.input_text is not None:
        raise GlmEngineError("give the prompts as --input_text or as --input_tokens, not both")
    if args.output_csv is not None:
        check_output_file(args.output_csv, "--output_csv")
    device = resolve_device(args.device)
    model_config, build_config = engine_configs(args.engine_dir)  # a clear error before any other work
    sampling = SamplingConfig(max_new_tokens=build_config.max_output_len if args.max_output_len is None
                              else args.max_output_len, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, random_seed=args.random_seed, end_id=model_config.eos_token_id)
    tokenizer = load_tokenizer(args, required=args.input_tokens is None)
    if args.input_tokens is not None:
        prompts = read_token_csv(args.input_tokens)
        texts = [tokenizer.decode(p) if tokenizer else ",".join(map(str, p)) for p in prompts]
    else:
        texts = args.input_text or [DEFAULT_INPUT_TEXT]
        if not all(text.strip() for text in texts):
            raise GlmEngineError("--input_text holds an empty prompt")
        prompts = [tokenizer.encode(text) for text in texts]
    session = load_session(args.engine_dir, device, **kv_cache_options(args))
    if not session.build_config.use_inflight_batching:  # a static batch: all prompts at once
        session.check_request(prompts, sampling.max_new_tokens)
    if args.streaming:
        outputs = stream_outputs(session, prompts, sampling, tokenizer)
    else:
        outputs = session.generate_requests(prompts, [sampling] * len(prompts))
    for text, output in zip(texts, outputs):
        print("\nInput --->\n\t" + text)
        response = tokenizer.decode(output) if tokenizer else ",".join(map(str, output))
        print("\nOutput --->\n\t" + clean_response(response))
    if args.output_csv is not None:
        write_token_csv(args.output_csv, outputs)
    sys.stdout.flush()


if __name__ == "__main__":
    run_tool(main)
