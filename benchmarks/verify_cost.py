"""On a GPU: what a speculative verify step costs against a decode step. Loads ENGINE_DIR
(built with --max_draft_len at least the largest of --tokens less one) with prompt
lookup on, so that its verify steps are captured as CUDA graphs; caches a prompt of
--context tokens for each of --batch_size sequences, then times, replayed in turns,
the decode step (one new token a sequence) and verify steps of each --tokens count
(the last token and tokens - 1 drafts a sequence, logits of all of them), median of
--repeats runs. Prints one line per step kind and the ratio to the decode step.
Usage: verify_cost.py ENGINE_DIR [--batch_size 1] [--context 1024] [--tokens 2 4 8 16]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.runtime.drafting import SpeculativeConfig  # noqa: E402
from model import load_session  # noqa: E402
from sampling_gpu import millis  # noqa: E402  (benchmarks/ is the script's directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine_dir")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    session = load_session(args.engine_dir, "cuda",
                           speculative=SpeculativeConfig("prompt_lookup", max(args.tokens) - 1))
    runner, manager = session.runner, session.block_manager
    generator = torch.Generator().manual_seed(0)
    tables, cached = [], []
    for _ in range(args.batch_size):
        prompt = torch.randint(3, session.model_config.vocab_size, (args.context,), generator=generator).tolist()
        table: list[int] = []
        assert manager.grow(table, args.context + max(args.tokens))
        runner.execute([table], [0], [prompt[:-1]])
        tables.append(table)
        cached.append(args.context - 1)
    steps = {"decode": lambda: runner.execute(tables, cached, [[7]] * args.batch_size)}
    for tokens in args.tokens:
        fed = [[7] * tokens] * args.batch_size
        steps[f"verify {tokens}"] = lambda fed=fed: runner.execute(tables, cached, fed, [len(fed[0])] * len(fed))
    times: dict[str, list[float]] = {name: [] for name in steps}
    with torch.inference_mode():
        for _ in range(3):  # turns, so that clocks and the other steps affect all alike
            for name, run in steps.items():
                times[name].append(millis(run, args.repeats))
    result = {name: sorted(values)[1] for name, values in times.items()}
    graphs = runner.verify_graphs is not None and all(runner.verify_graphs.takes([[7] * t] * args.batch_size)
                                                      for t in args.tokens)
    print(f"batch {args.batch_size}, context {args.context}, verify graphs {'captured' if graphs else 'missing'}")
    for name, value in result.items():
        print(f"{name:10s} {value:8.3f} ms  {value / result['decode']:.3f}x decode")
    if args.json:
        Path(args.json).write_text(json.dumps({"batch_size": args.batch_size, "context": args.context,
                                               "verify_graphs": graphs, "ms": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
