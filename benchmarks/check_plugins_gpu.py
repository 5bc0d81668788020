"""On a GPU: greedy tokens of a plugin engine with CUDA graphs, the same engine
without graphs, and the reference engine of the same weights, on random
prompts; prints how far they agree and the logits' relative difference.
Usage: check_plugins_gpu.py REFERENCE_ENGINE PLUGIN_ENGINE"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.tools.compare import first_divergence, relative_error  # noqa: E402
from glm_engine.text.prompts import random_prompts  # noqa: E402
from glm_engine.runtime.sampling import SamplingConfig  # noqa: E402
from model import load_session  # noqa: E402


def main() -> None:
    reference_dir, plugin_dir = sys.argv[1], sys.argv[2]
    prompts = random_prompts([17, 300, 1000, 64], 60000, seed=0)
    sampling = SamplingConfig(max_new_tokens=64, end_id=-1)
    outputs = {}
    for name, directory, graphs in [("plugin+graphs", plugin_dir, True), ("plugin eager", plugin_dir, False),
                                    ("reference", reference_dir, False)]:
        session = load_session(directory, "cuda", cuda_graphs=graphs)
        outputs[name] = [output.token_ids for output in session.generate(prompts, sampling)]
        if name == "plugin eager":
            plugin_logits = session.prompt_logits(prompts[1])
        if name == "reference":
            reference_logits = session.prompt_logits(prompts[1])
        del session
        torch.cuda.empty_cache()
    print("graphs vs eager identical:", outputs["plugin+graphs"] == outputs["plugin eager"])
    print("plugin vs reference first divergence per prompt:",
          [first_divergence(a, b) for a, b in zip(outputs["plugin+graphs"], outputs["reference"])], "of 64")
    error = relative_error(plugin_logits, reference_logits)
    print(f"prefill logits, plugin vs reference engine: relative difference {error:.3e}")


if __name__ == "__main__":
    main()
