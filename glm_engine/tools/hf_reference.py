"""The Hugging Face reference: the transformers model that computes a family's
network (ChatGLM and GLM-4: `GlmForCausalLM`; GLM-4-0414: `Glm4ForCausalLM`), filled with runtime-layout weights (an
engine's, or a checkpoint's through weight.py) as the family maps them
(reference_config, reference_state_dict in glm_engine/models), and its batched
greedy generation."""

from __future__ import annotations

import torch

from glm_engine.config import ModelConfig
from glm_engine.models import family
from glm_engine.quantization import dequantize_weights


def build_glm_model(config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device | str,
                    dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"):
    """The family's transformers model (GlmForCausalLM or Glm4ForCausalLM) on `device` with exactly
    these weights, in `dtype` (default: the embedding's); weight-only quantized linears
    are dequantized to it here, once."""
    model_family = family(config.model_type)
    dtype = dtype or weights["word_embeddings.weight"].dtype
    weights = {name: tensor.to(dtype) for name, tensor in dequantize_weights(weights, dtype).items()}
    hf_config = model_family.reference_config(config)
    hf_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = model_family.reference_model(hf_config)
    model.load_state_dict(model_family.reference_state_dict(config, weights), strict=True, assign=True)
    # The rotary module's buffers are not in the state dict and were made on meta.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config)
    return model.to(device=device, dtype=dtype).eval()


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, longest] of prompts padded on the left, as
    Hugging Face's generate() takes a batch."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return input_ids, attention_mask


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, end_id: int | list[int], pad_id: int,
                num_beams: int = 1) -> list[list[int]]:
    """Greedy (or, with num_beams, the best beam's) outputs of the Hugging Face model for
    a batch (left-padded, with its attention mask), each cut before the first end token;
    `end_id` is one id or every end id of the model (GLM-4 has three)."""
    end_ids = list(end_id) if isinstance(end_id, (list, tuple)) else [end_id]
    input_ids, attention_mask = left_padded(prompts, pad_id, next(model.parameters()).device)
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=end_ids, pad_token_id=pad_id,
                               num_beams=num_beams, top_k=None, top_p=None, temperature=None)
    outputs = []
    for row in generated[:, input_ids.shape[1]:].tolist():
        ends = [index for index, token in enumerate(row) if token in end_ids]
        outputs.append(row[:ends[0]] if ends else row)
    return outputs
