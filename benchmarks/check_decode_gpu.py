"""On a GPU: how often each engine's greedy choice agrees with GlmForCausalLM in
float32 on the same weights, at every position of a random prompt, through the
prefill path and through single decode steps (graph and eager).
Usage: check_decode_gpu.py ENGINE [ENGINE ...]"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.tools.compare import relative_error  # noqa: E402
from glm_engine.engine_format.engine import load_whole_engine  # noqa: E402
from glm_engine.tools.hf_reference import build_glm_model  # noqa: E402
from glm_engine.text.prompts import random_prompts  # noqa: E402
from model import load_session  # noqa: E402


@torch.inference_mode()
def main() -> None:
    engines = sys.argv[1:]
    prompt = random_prompts([512], 60000, seed=5)[0]
    engine = load_whole_engine(engines[0], "cpu")
    # float32, weight-only layers dequantized (the float() of packed int4 bytes was wrong)
    hf = build_glm_model(engine.model_config, engine.weights, "cuda", torch.float32, attn_implementation="eager")
    del engine
    truth = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
    top2 = truth.topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1])
    print(f"fp32 top-2 logit gap: median {gaps.median():.4f}, share under 0.01: {(gaps < 0.01).float().mean():.3f}")
    del hf
    torch.cuda.empty_cache()
    steps = list(range(32, 512, 32))
    for directory in engines:
        session = load_session(directory, "cuda")
        runner = session.runner
        prefill = session.prompt_logits(prompt)
        agree = (prefill.argmax(-1) == truth.argmax(-1)).float().mean().item()
        print(f"{directory}: prefill logits rel err {relative_error(prefill, truth):.3e}, argmax agreement {agree:.3f}")
        table: list[int] = []
        session.block_manager.grow(table, len(prompt))
        for mode in ("graph", "eager"):
            if mode == "graph" and runner.decode_graphs is None:
                continue
            errors, matches = [], 0
            for k in steps:
                runner.forward([table], [0], [prompt[:k]])
                if mode == "graph":
                    logits, _ = runner.decode_graphs.run([table], [k], [[prompt[k]]])
                else:
                    logits = runner.forward([table], [k], [[prompt[k]]])
                errors.append(relative_error(logits[0], truth[k]))
                matches += int(logits[0].argmax() == truth[k].argmax())
            print(f"  decode ({mode}) at {len(steps)} positions: rel err mean {sum(errors) / len(errors):.3e}, "
                  f"max {max(errors):.3e}, argmax agreement {matches}/{len(steps)}")
        del session
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
