"""Calibration for the activation-aware quantization schemes: the dense network (plain
PyTorch reference ops) runs over calibration text, and each decoder linear's inputs
are recorded: mean and max |x| per input channel over every token, and a sample of whole
input rows (the same rows of each prompt for every linear)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from glm_engine.api import load_session
from glm_engine.config import BuildConfig, ModelConfig, kv_cache_scale_name
from glm_engine.engine_format.engine import Engine
from glm_engine.models import family
from glm_engine.models.layers import DecoderLinear
from glm_engine.quantization.awq import apply_awq
from glm_engine.quantization.input_scaling import LinearInputs
from glm_engine.quantization.methods import WeightOnly
from glm_engine.quantization.smoothquant import apply_smoothquant
from glm_engine.runtime.session import Session

MAX_TOKENS = 512  # of each calibration text
SAMPLE_ROWS = 512  # input rows kept per linear, spread over the texts


def calibration_prompts(tokenizer, texts: list[str], size: int) -> list[list[int]]:
    """The first `size` texts that hold more than white space, as token ids, each cut to
    MAX_TOKENS tokens."""
    return [tokenizer.encode(text)[:MAX_TOKENS] for text in [text for text in texts if text.strip()][:size]]


@contextlib.contextmanager
def dense_session(config: ModelConfig, weights: dict[str, torch.Tensor], prompts: list[list[int]],
                  device: torch.device) -> Iterator[Session]:
    """The dense runtime-layout `weights` loaded as a session on the reference ops, in
    float32 on the CPU or in the weights' dtype on a GPU, for `prompts` one at a time."""
    dtype = "float32" if device.type == "cpu" else str(next(iter(weights.values())).dtype).removeprefix("torch.")
    build = BuildConfig(dtype=dtype, max_batch_size=1, max_input_len=max(map(len, prompts)), max_output_len=1)
    dense = {name: tensor.to(build.torch_dtype) for name, tensor in weights.items()}
    with tempfile.TemporaryDirectory() as scratch:
        yield load_session(Engine(Path(scratch), config, build, dense), device, cuda_graphs=False)


def linear_inputs(config: ModelConfig, weights: dict[str, torch.Tensor], prompts: list[list[int]],
                  device: torch.device, seed: int = 0) -> dict[str, LinearInputs]:
    """Each decoder linear's calibration inputs (keyed like "layers.0.mlp.dense_4h_to_h"),
    from the dense network (dense_session) run over `prompts`."""
    sums: dict[str, torch.Tensor] = {}
    maxima: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(seed)
    rows_per_prompt = -(-SAMPLE_ROWS // len(prompts))
    picked = torch.empty(0, dtype=torch.long)

    def recorder(name: str):
        def record(module: DecoderLinear, args: tuple) -> None:
            x = args[0].float()
            sums[name] = sums.get(name, 0) + x.abs().sum(dim=0)
            maxima[name] = torch.maximum(maxima.get(name, torch.zeros_like(x[0])), x.abs().amax(dim=0))
            samples.setdefault(name, []).append(x[picked.to(x.device)])
        return record

    with dense_session(config, weights, prompts, device) as session:
        hooks = [module.register_forward_pre_hook(recorder(name))
                 for name, module in session.runner.network.named_modules() if isinstance(module, DecoderLinear)]
        with torch.inference_mode():
            for prompt in prompts:
                picked = torch.randperm(len(prompt), generator=generator)[:rows_per_prompt]
                session.prompt_logits(prompt)
        for hook in hooks:
            hook.remove()
    tokens = sum(map(len, prompts))
    linears = family(config.model_type).LINEARS
    missing = [f"layers.0.{linear}" for linear in linears if f"layers.0.{linear}" not in sums]
    if missing:
        raise RuntimeError(f"calibration recorded no input of {missing[0]}: the network's module names are not "
                           "the runtime layout's")
    # (On the calibration device: the scale search quantizes each weight there, ALPHA_GRID times.)
    return {name: LinearInputs(total / tokens, maxima[name], torch.cat(samples[name])) for name, total in sums.items()}


def scale_for_awq(weights: dict[str, torch.Tensor], config: ModelConfig, prompts: list[list[int]],
                  method: WeightOnly, device: torch.device) -> dict[str, float]:
    """AWQ's scaling of the dense `weights` in place (quantization/awq.py), calibrated on
    `prompts`; returns each scaled linear's alpha."""
    inputs = linear_inputs(config, weights, prompts, device)
    return apply_awq(weights, config.num_layers, config.ffn_hidden_size, inputs, method)


def smooth_for_smoothquant(weights: dict[str, torch.Tensor], config: ModelConfig, prompts: list[list[int]],
                           alpha: float, device: torch.device) -> None:
    """SmoothQuant's smoothing of the dense `weights` in place (quantization/smoothquant.py),
    calibrated on `prompts`."""
    inputs = linear_inputs(config, weights, prompts, device)
    apply_smoothquant(weights, config.num_layers, config.ffn_hidden_size, inputs, alpha)


def kv_cache_scales(weights: dict[str, torch.Tensor], config: ModelConfig, prompts: list[list[int]],
                    device: torch.device) -> dict[str, torch.Tensor]:
    """An INT8 K/V cache's scales, max|value| / 127 over the calibration prompts' keys
    (rotated) and values, per layer and K/V group: engine tensors
    layers.{i}.self_attention.kv_cache_scale [2, groups] float32 (runtime/kv_cache.py)."""
    maxima = torch.zeros(config.num_layers, 2, config.multi_query_group_num, device=device)
    with dense_session(config, weights, prompts, device) as session:
        cache, write = session.runner.kv_cache, session.runner.kv_cache.write

        def record(layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
            for index, values in enumerate((key, value)):  # [N, groups, D]
                maxima[layer, index] = torch.maximum(maxima[layer, index], values.float().abs().amax(dim=(0, 2)))
            write(layer, slots, key, value)

        cache.write = record  # the reference attention stores every layer's rotated keys and values through it
        with torch.inference_mode():
            for prompt in prompts:
                session.prompt_logits(prompt)
    scales = (maxima.clamp(min=1e-6) / 127.0).cpu()
    return {kv_cache_scale_name(layer): scales[layer] for layer in range(config.num_layers)}
