"""Started under torchrun by tests/test_tensor_parallel.py: loads an engine on the CPU,
generates greedily for a mixed batch (in flight, two at a time, so that prompts and
decode steps mix) and takes the logits at every position of one prompt; rank 0 saves
them to the file named by the second argument."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.runtime.sampling import SamplingConfig  # noqa: E402
from model import load_session  # noqa: E402

PROMPTS = [[64790, 64792, 5, 17, 300, 41], [64790, 64792, 9], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [900, 3]]


def main(engine_dir: str, output: str) -> None:
    session = load_session(engine_dir, "cpu")
    vocab = session.model_config.vocab_size
    prompts = [[token % vocab for token in prompt] for prompt in PROMPTS]
    greedy = SamplingConfig(max_new_tokens=10, end_id=-1)
    session.configure_scheduler(max_in_flight=2)
    tokens = [output.token_ids for output in session.generate(prompts, greedy)]
    session.configure_scheduler()
    sampled = [output.token_ids for output in session.generate(prompts[:2], SamplingConfig(max_new_tokens=6, top_k=0,
                                                                                           end_id=-1))]
    logits = session.prompt_logits(prompts[2])
    if session.is_main_rank:
        torch.save({"tokens": tokens, "sampled": sampled, "logits": logits}, output)


if __name__ == "__main__":
    main(*sys.argv[1:3])
