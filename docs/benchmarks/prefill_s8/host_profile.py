"""Scratch: cProfile the host side of one 2048-token prefill on the CPU (tiny model, reference ops)."""
import cProfile, pstats, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from checkpoints import tiny_config
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.engine import Engine
from glm_engine.layout import weight_shapes
from glm_engine.prompts import random_prompts
from glm_engine.runtime.sampling import SamplingConfig
from model import load_session
tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
config = ModelConfig.from_hf_config(tiny_config(seq_length=4096))
weights = {n: torch.randn(s) * 0.02 for n, s in weight_shapes(config).items()}
session = load_session(Engine(Path("."), config, BuildConfig(max_batch_size=1, max_input_len=tokens, dtype="float32"), dict(weights)), "cpu")
prompts = random_prompts([tokens], config.vocab_size, seed=0)
sampling = SamplingConfig(max_new_tokens=1, end_id=-1)
session.generate(prompts, sampling)
t = time.perf_counter(); session.generate(prompts, sampling); print("wall ms", 1000 * (time.perf_counter() - t))
cProfile.run("session.generate(prompts, sampling)", "/tmp/hp.prof")
pstats.Stats("/tmp/hp.prof").sort_stats("cumulative").print_stats(35)
