"""Trains a tiny ChatGLM2 that has learned to copy, and writes it as a ChatGLM2 checkpoint
(config.json, model.safetensors, and the tokenizer of --tokenizer_dir when given).
Random weights copy nothing, so speculative decoding's acceptance is measured on this
model instead: its training text is random spans of tokens, each repeated until the
sequence is full, so it learns to continue a span it has seen (an induction head), as a summary
copies from its article. The demo tokenizer's 1024 ids learn with --batch 64 (800 steps,
~6 min on 2 CPU cores; 16 a step do not). Trained as transformers' GlmForCausalLM (the
network our engine computes, glm_engine/models/chatglm.py's reference) on the CPU in
under a minute (the default tiny vocabulary); its weights then take the checkpoint's names.
Usage: python scripts/train_copying_checkpoint.py OUTPUT_DIR [--steps 800] [--seed 0]
[--vocab_size 64] [--hidden_size 64] [--tokenizer_dir DIR] [--device cpu] [--batch 16] [--length 64]
[--learning_rate 3e-3]"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.models import chatglm, read_model_config  # noqa: E402
from glm_engine.text.tokenizer import TOKENIZER_FILES  # noqa: E402

FIRST_TOKEN = 3  # spans avoid the special tokens below it (padding, start, end)
LONGEST_SPAN = 24  # the loss starts past it: from there on every token repeats an earlier one


def copying_config(vocab_size: int, hidden_size: int) -> dict:
    """The config.json of the tiny ChatGLM2 trained here (ChatGLM2-6B's fields, tiny sizes)."""
    return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": 2, "hidden_size": hidden_size,
            "num_attention_heads": 4, "kv_channels": hidden_size // 4, "multi_query_attention": True,
            "multi_query_group_num": 2, "ffn_hidden_size": 2 * hidden_size, "padded_vocab_size": vocab_size, "seq_length": 512, "layernorm_epsilon": 1e-5,
            "rmsnorm": True, "add_qkv_bias": True, "add_bias_linear": False,
            "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "original_rope": True,
            "tie_word_embeddings": False, "torch_dtype": "float32", "eos_token_id": 2, "pad_token_id": 0}


def copying_batch(generator: torch.Generator, batch: int, length: int, vocab_size: int) -> torch.Tensor:
    """[batch, length] token ids: each row a random span of 4-LONGEST_SPAN tokens repeated to the end."""
    rows = []
    for _ in range(batch):
        span = int(torch.randint(4, LONGEST_SPAN + 1, (1,), generator=generator))
        tokens = torch.randint(FIRST_TOKEN, vocab_size, (span,), generator=generator)
        rows.append(tokens.repeat(-(-length // span))[:length])
    return torch.stack(rows)


def train(config: dict, steps: int, seed: int, device: str = "cpu", batch: int = 16,
          length: int = 64, learning_rate: float = 3e-3) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of the network trained to copy (loss on every position after a
    span's first occurrence could be known: past LONGEST_SPAN)."""
    torch.manual_seed(seed)
    model_config = read_model_config(config)
    model = chatglm.reference_model(chatglm.reference_config(model_config)).float().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        tokens = copying_batch(generator, batch, length, model_config.vocab_size).to(device)
        logits = model(input_ids=tokens).logits[:, LONGEST_SPAN:-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 tokens[:, LONGEST_SPAN + 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", file=sys.stderr)
    return checkpoint_tensors(model_config, {name: tensor.cpu() for name, tensor in model.state_dict().items()})


def checkpoint_tensors(config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GlmForCausalLM parameters under ChatGLM2's checkpoint names (the inverse of
    chatglm.reference_state_dict: q, k and v rows back into query_key_value)."""
    weights = {"word_embeddings.weight": state["model.embed_tokens.weight"],
               "final_layernorm.weight": state["model.norm.weight"], "output_layer.weight": state["lm_head.weight"]}
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            weights[ours + name + ".weight"] = state[theirs + name + ".weight"]
        for kind in ("weight", "bias"):
            weights[ours + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [state[theirs + f"self_attn.{name}.{kind}"] for name in ("q_proj", "k_proj", "v_proj")])
        weights[ours + "self_attention.dense.weight"] = state[theirs + "self_attn.o_proj.weight"]
        weights[ours + "mlp.dense_h_to_4h.weight"] = state[theirs + "mlp.gate_up_proj.weight"]
        weights[ours + "mlp.dense_4h_to_h.weight"] = state[theirs + "mlp.down_proj.weight"]
    return {chatglm.checkpoint_name(name): tensor.detach().contiguous() for name, tensor in weights.items()}


def write_copying_checkpoint(output_dir: Path, steps: int = 800, seed: int = 0, vocab_size: int = 64,
                             hidden_size: int = 64, tokenizer_dir: Path | None = None, device: str = "cpu",
                             batch: int = 16, length: int = 64, learning_rate: float = 3e-3) -> Path:
    """Trains the copying network and writes its checkpoint to `output_dir` (a new directory)."""
    from safetensors.torch import save_file

    config = copying_config(vocab_size, hidden_size)
    tensors = train(config, steps, seed, device, batch, length, learning_rate)
    output_dir.mkdir(parents=True)
    (output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    for file_name in TOKENIZER_FILES if tokenizer_dir else ():
        if (tokenizer_dir / file_name).is_file():
            shutil.copyfile(tokenizer_dir / file_name, output_dir / file_name)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=64, help="1024 for the demo tokenizer's ids")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--tokenizer_dir", type=Path, default=None)
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--batch", type=int, default=16, help="sequences a training step")
    parser.add_argument("--length", type=int, default=64, help="tokens a training sequence (positions it learns)")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="peak of the one-cycle schedule")
    args = parser.parse_args()
    if args.output_dir.exists():
        sys.exit(f"train_copying_checkpoint.py: error: {args.output_dir} exists; name a new directory")
    write_copying_checkpoint(args.output_dir, args.steps, args.seed, args.vocab_size, args.hidden_size,
                             args.tokenizer_dir, args.device, args.batch, args.length,
                             args.learning_rate)


if __name__ == "__main__":
    main()
