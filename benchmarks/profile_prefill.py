"""Profiles one batched prefill of the engine and of GlmForCausalLM (eager) at
ChatGLM2-6B shape with random fp16 weights made on the GPU; prints the kernels
that take the most time on each side. With --plugins the engine runs the A+L+G+F32
flags (attention, layernorm and gemm plugins, context FMHA with float32
accumulation); without, the reference ops.
Usage: profile_prefill.py [BATCH TOKENS] [--plugins] (default 8 1024)"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.config import BuildConfig, ModelConfig  # noqa: E402
from glm_engine.models import read_model_config  # noqa: E402
from glm_engine.presets import CHATGLM2_6B  # noqa: E402
from glm_engine.engine_format.engine import Engine  # noqa: E402
from glm_engine.tools.hf_reference import build_glm_model  # noqa: E402
from glm_engine.runtime.sampling import SamplingConfig  # noqa: E402
from glm_engine.engine_format.layout import weight_shapes  # noqa: E402
from glm_engine.text.prompts import random_prompts  # noqa: E402
from model import load_session  # noqa: E402


def main() -> None:
    numbers = [int(arg) for arg in sys.argv[1:] if arg != "--plugins"]
    if len(numbers) not in (0, 2):
        sys.exit(__doc__.splitlines()[-1])
    batch, tokens = numbers or (8, 1024)
    plugins = dict(use_gpt_attention_plugin="float16", use_layernorm_plugin="float16", use_gemm_plugin="float16",
                   context_fmha="enabled_with_fp32_acc") if "--plugins" in sys.argv else {}
    config = read_model_config(CHATGLM2_6B)
    weights = {name: torch.randn(shape, device="cuda", dtype=torch.float16) / (shape[-1] ** 0.5 if len(shape) > 1
               else 1.0) for name, shape in weight_shapes(config).items()}
    prompts = random_prompts([tokens] * batch, 60000, seed=0)
    build = BuildConfig(max_batch_size=batch, max_input_len=tokens, **plugins)
    session = load_session(Engine(Path("."), config, build, dict(weights)), "cuda")
    sampling = SamplingConfig(max_new_tokens=1, end_id=-1)
    hf = build_glm_model(config, weights, "cuda", attn_implementation="eager")
    input_ids = torch.tensor(prompts, device="cuda")
    sides = {"glm_engine": lambda: session.generate(prompts, sampling),
             "hf_eager": lambda: hf(input_ids=input_ids, logits_to_keep=1)}
    for name, run in sides.items():
        with torch.inference_mode():
            run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
                run()
                torch.cuda.synchronize()
        print(f"==== {name}: batch {batch} x {tokens} tokens")
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
