"""Speculative decoding on a model that copies: trains the tiny copying ChatGLM2
(scripts/train_copying_checkpoint.py), builds a float32 engine of it (--max_draft_len 8;
with --plugins float16 and the plugins, whose steps a GPU runs as CUDA graphs),
then generates 48 tokens for each of 8 prompts that repeat a random span, one prompt at
a time (batch 1), without and with prompt lookup in turns (two runs each). Prints tokens/s
of each run, the acceptance and forward steps per generated token, and whether the tokens
are identical. On the CPU by default (its engine runs the reference ops there).
Usage: copying_speedup.py [--device cpu|cuda] [--steps 700] [--plugins]"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from glm_engine.api import SamplingConfig, SpeculativeConfig, load_session  # noqa: E402
from train_copying_checkpoint import FIRST_TOKEN, write_copying_checkpoint  # noqa: E402


def repeated_spans(count: int, vocab_size: int) -> list[list[int]]:
    """Prompts of 12-29 tokens, each a random span of 4-11 tokens repeated (the model's task)."""
    rng = random.Random(10)
    prompts = []
    for _ in range(count):
        span = [rng.randrange(FIRST_TOKEN, vocab_size) for _ in range(rng.randrange(4, 12))]
        prompts.append((span * 4)[:rng.randrange(12, 30)])
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--plugins", action="store_true",
                        help="a float16 engine with the attention, context FMHA and GEMM plugins (a GPU's CUDA graphs)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    checkpoint = write_copying_checkpoint(work / "checkpoint", steps=args.steps, device=args.device)
    engine_flags = (["--dtype", "float16", "--use_gpt_attention_plugin", "float16", "--enable_context_fmha_fp32_acc",
                     "--use_gemm_plugin", "float16"] if args.plugins else ["--dtype", "float32"])
    subprocess.run([sys.executable, str(ROOT / "build.py"), "--model_dir", str(checkpoint), "--output_dir",
                    str(work / "engine"), *engine_flags, "--max_input_len", "64", "--max_output_len", "64",
                    "--max_draft_len", "8", "--paged_kv_cache", "--remove_input_padding", "--log_level", "error"],
                   check=True)
    prompts, sampling = repeated_spans(8, 64), SamplingConfig(max_new_tokens=48, end_id=-1)
    outputs: dict[str, list] = {}
    for name in ("plain", "prompt lookup") * 2:
        options = {"speculative": SpeculativeConfig("prompt_lookup", 8)} if name != "plain" else {}
        session = load_session(work / "engine", args.device, **options)
        start = time.perf_counter()
        tokens = [session.generate([prompt], sampling)[0].token_ids for prompt in prompts]
        seconds = time.perf_counter() - start
        outputs.setdefault(name, []).append(tokens)
        print(f"{name:14s} {len(prompts) * sampling.max_new_tokens / seconds:8.1f} tok/s")
        if options:
            print("  ", session.scheduler.speculative_counts())
    print("identical tokens:", all(run == outputs["plain"][0] for runs in outputs.values() for run in runs))


if __name__ == "__main__":
    main()
