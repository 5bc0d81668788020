"""The generation session: loads an engine, checks requests against its limits,
runs prefill then decode steps over packed sequences, samples and stops."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from glm_engine import GlmEngineError
from glm_engine.engine import Engine, load_engine
from glm_engine.runtime.kv_cache import KVCache, make_attention_batch
from glm_engine.runtime.sampling import SamplingConfig, sample
from model import build_model

logger = logging.getLogger(__name__)


def resolve_device(name: str | None) -> torch.device:
    """`name`, or CUDA when available and the CPU otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GlmEngineError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GlmEngineError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return device


class Session:
    """Generates for batches of tokenized prompts with one loaded engine."""

    def __init__(self, engine: Engine | str | Path, device: str | torch.device | None = None) -> None:
        self.device = resolve_device(str(device) if device is not None else None)
        if not isinstance(engine, Engine):
            engine = load_engine(engine, self.device)
        self.engine = engine
        self.model_config = engine.model_config
        self.build_config = engine.build_config
        self.model = build_model(engine.model_config, engine.weights, self.device)
        engine.weights = {}  # the model holds them now

    def check_request(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Raises GlmEngineError when a request breaks the engine's limits."""
        build, vocab = self.build_config, self.model_config.vocab_size
        if not prompts:
            raise GlmEngineError("no prompts given")
        if len(prompts) > build.max_batch_size:
            raise GlmEngineError(f"{len(prompts)} prompts exceed the engine's max_batch_size "
                                 f"{build.max_batch_size}; send fewer or rebuild with a larger --max_batch_size")
        if max_new_tokens > build.max_output_len:
            raise GlmEngineError(f"max_output_len {max_new_tokens} exceeds the engine's max_output_len "
                                 f"{build.max_output_len}; ask for fewer tokens or rebuild")
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise GlmEngineError(f"prompt {index} is empty")
            if len(prompt) > build.max_input_len:
                raise GlmEngineError(f"prompt {index} has {len(prompt)} tokens, over the engine's "
                                     f"max_input_len {build.max_input_len}; shorten it or rebuild")
            bad = [token for token in prompt if not 0 <= token < vocab]
            if bad:
                raise GlmEngineError(f"prompt {index} holds token id {bad[0]}, outside the vocabulary "
                                     f"[0, {vocab})")

    def _new_cache(self, num_sequences: int, tokens_per_sequence: int) -> KVCache:
        config = self.model_config
        return KVCache(config.num_layers, num_sequences, tokens_per_sequence, config.multi_query_group_num,
                       config.kv_channels, self.build_config.torch_dtype, self.device)

    @torch.inference_mode()
    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        """Float32 logits [len(prompt), vocab] at every position of one prompt."""
        self.check_request([prompt], 1)
        cache = self._new_cache(1, len(prompt))
        batch = make_attention_batch([[0]], [0], [len(prompt)], len(prompt), self.device,
                                     self.build_config.torch_dtype)
        input_ids = torch.tensor(prompt, dtype=torch.long, device=self.device)
        return self.model.logits(self.model(input_ids, batch, cache))

    @torch.inference_mode()
    def generate_stream(self, prompts: list[list[int]],
                        sampling: SamplingConfig) -> Iterator[list[tuple[int, int]]]:
        """Yields, after each step, the (prompt index, token) pairs it produced; a
        sequence stops at `sampling.end_id` (not yielded) or after max_new_tokens."""
        self.check_request(prompts, sampling.max_new_tokens)
        generator = torch.Generator(device=self.device)
        if sampling.random_seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.random_seed)
        block_size = max(map(len, prompts)) + sampling.max_new_tokens
        cache = self._new_cache(len(prompts), block_size)
        cached = [0] * len(prompts)
        produced = [0] * len(prompts)
        active = list(range(len(prompts)))
        new_tokens = [list(prompt) for prompt in prompts]
        while active:
            batch = make_attention_batch([[i] for i in active], [cached[i] for i in active],
                                         [len(new_tokens[i]) for i in active], block_size, self.device,
                                         self.build_config.torch_dtype)
            input_ids = torch.tensor([t for i in active for t in new_tokens[i]], dtype=torch.long,
                                     device=self.device)
            hidden = self.model(input_ids, batch, cache)
            chosen = sample(self.model.logits(hidden[batch.last_token_index]), sampling, generator).tolist()
            step, still_active = [], []
            for i, token in zip(active, chosen):
                cached[i] += len(new_tokens[i])
                if token == sampling.end_id:
                    continue
                step.append((i, token))
                produced[i] += 1
                new_tokens[i] = [token]
                if produced[i] < sampling.max_new_tokens:
                    still_active.append(i)
            active = still_active
            yield step

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        """Generated ids of each prompt (prompt excluded, end token excluded)."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in self.generate_stream(prompts, sampling):
            for index, token in step:
                outputs[index].append(token)
        return outputs
