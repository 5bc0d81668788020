"""Trains a tiny ChatGLM2 that has learned to copy, and writes it as a ChatGLM2 checkpoint
(config.json, model.safetensors, and the tokenizer of --tokenizer_dir when given).
Random weights copy nothing, so speculative decoding's acceptance is measured on this
model instead. Two tasks:
- spans (default): random spans of tokens, each repeated until the sequence is full, so it
  learns to continue a span it has seen (an induction head). The demo tokenizer's 1024 ids
  learn with --batch 64 (800 steps, ~6 min on 2 CPU cores; 16 a step do not); the default
  tiny vocabulary in under a minute.
- lead: summarize.py's prompt (`[gMASK] sop` ARTICLE `TL;DR:`, --tokenizer_dir's ids) followed
  by the article again from its start (and again after another marker), as a lead-sentences
  summary copies its article. The "articles" are random tokens drawn with the frequencies of
  the bundled cnn_dailymail articles' tokens, so the model learns to copy, not to remember the
  articles it is then measured on (their prompts are 550-650 demo-tokenizer tokens). It copies
  only within the positions it was trained on: `--vocab_size 1024 --hidden_size 128 --length
  512 --batch 32 --steps 3000` (~50 min on 2 CPU cores) copies summarize.py --max_input_len 384.
Trained as transformers' GlmForCausalLM (the network our engine computes,
glm_engine/models/chatglm.py's reference); its weights then take the checkpoint's names.
Usage: python scripts/train_copying_checkpoint.py OUTPUT_DIR [--task spans|lead] [--steps 800]
[--seed 0] [--vocab_size 64] [--hidden_size 64] [--tokenizer_dir DIR] [--device cpu] [--batch 16]
[--length 64] [--learning_rate 3e-3]"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.models import chatglm, read_model_config  # noqa: E402
from glm_engine.text.dataset import BUNDLED_SAMPLE, load_articles  # noqa: E402
from glm_engine.text.tokenizer import TOKENIZER_FILES, ChatGLMTokenizer  # noqa: E402

FIRST_TOKEN = 3  # spans avoid the special tokens below it (padding, start, end)
LONGEST_SPAN = 24  # the loss starts past it: from there on every token repeats an earlier one
LEAD_MARKER = " TL;DR: "  # what summarize.py appends to an article (stripped)
SHORTEST_LEAD = 32  # a lead-task row copies at least this many tokens of its article
IGNORED = -100  # a label the loss skips


def copying_config(vocab_size: int, hidden_size: int, seq_length: int = 512) -> dict:
    """The config.json of the tiny ChatGLM2 trained here (ChatGLM2-6B's fields, tiny sizes)."""
    return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": 2, "hidden_size": hidden_size,
            "num_attention_heads": 4, "kv_channels": hidden_size // 4, "multi_query_attention": True,
            "multi_query_group_num": 2, "ffn_hidden_size": 2 * hidden_size, "padded_vocab_size": vocab_size,
            "seq_length": seq_length, "layernorm_epsilon": 1e-5,
            "rmsnorm": True, "add_qkv_bias": True, "add_bias_linear": False,
            "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "original_rope": True,
            "tie_word_embeddings": False, "torch_dtype": "float32", "eos_token_id": 2, "pad_token_id": 0}


def copying_batch(generator: torch.Generator, batch: int, length: int,
                  vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, length] token ids, each row a random span of 4-LONGEST_SPAN tokens repeated to
    the end, and their labels (the next token, from LONGEST_SPAN on)."""
    rows = []
    for _ in range(batch):
        span = int(torch.randint(4, LONGEST_SPAN + 1, (1,), generator=generator))
        tokens = torch.randint(FIRST_TOKEN, vocab_size, (span,), generator=generator)
        rows.append(tokens.repeat(-(-length // span))[:length])
    tokens = torch.stack(rows)
    labels = torch.full_like(tokens, IGNORED)
    labels[:, LONGEST_SPAN:-1] = tokens[:, LONGEST_SPAN + 1:]
    return tokens, labels


@dataclass(frozen=True)
class LeadTask:
    """The lead task's pieces: the prompt's prefix and marker ids, and the article tokens'
    frequencies to draw random articles from."""

    prefix: list[int]
    marker: list[int]
    frequencies: torch.Tensor  # [vocab_size]

    @classmethod
    def from_tokenizer(cls, tokenizer_dir: Path, vocab_size: int) -> "LeadTask":
        """The task in `tokenizer_dir`'s ids, the frequencies those of the bundled articles."""
        tokenizer = ChatGLMTokenizer.from_dir(tokenizer_dir)
        frequencies = torch.zeros(vocab_size)
        for record in load_articles(str(BUNDLED_SAMPLE)):
            ids = torch.tensor(tokenizer.encode(record["article"], add_prefix=False))
            frequencies += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
        prefix, marker = tokenizer.encode("", add_prefix=True), tokenizer.encode(LEAD_MARKER.strip(), add_prefix=False)
        if max(prefix + marker) >= vocab_size:
            raise ValueError(f"{tokenizer_dir}'s ids reach {max(prefix + marker)}: pass --vocab_size above it "
                             "(1024 for data/demo_tokenizer)")
        return cls(prefix, marker, frequencies)

    def batch(self, generator: torch.Generator, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, length] rows of `prefix ARTICLE marker ARTICLE marker ...` and their labels:
        the next token from the first marker's last on. Articles of 4 tokens up to all but
        SHORTEST_LEAD of the row, log-uniform: short ones repeat often, which is how the copying
        is found; long ones teach copying from far back, and starting at the article's start."""
        fixed = len(self.prefix) + len(self.marker)
        tokens = torch.empty(batch, length, dtype=torch.long)
        labels = torch.full_like(tokens, IGNORED)
        longest = length - fixed - SHORTEST_LEAD
        for row in range(batch):
            body = int(4 * (longest / 4) ** float(torch.rand((), generator=generator)))  # log-uniform in [4, longest]
            article = torch.multinomial(self.frequencies, body, replacement=True, generator=generator)
            period = torch.cat([article, torch.tensor(self.marker)])
            repeats = period.repeat(-(-(length - len(self.prefix)) // len(period)))
            tokens[row] = torch.cat([torch.tensor(self.prefix), repeats])[:length]
            first_lead = len(self.prefix) + len(period)  # the copy's first token
            labels[row, first_lead - 1:-1] = tokens[row, first_lead:]
        return tokens, labels


def train(config: dict, steps: int, seed: int, device: str = "cpu", batch: int = 16,
          length: int = 64, learning_rate: float = 3e-3, lead: LeadTask | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of the network trained to copy: spans (loss on every position
    after a span's first occurrence could be known: past LONGEST_SPAN), or the `lead` task."""
    torch.manual_seed(seed)
    model_config = read_model_config(config)
    model = chatglm.reference_model(chatglm.reference_config(model_config)).float().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        tokens, labels = (lead.batch(generator, batch, length) if lead else
                          copying_batch(generator, batch, length, model_config.vocab_size))
        logits = model(input_ids=tokens.to(device)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.to(device).reshape(-1),
                                                 ignore_index=IGNORED)
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
                             batch: int = 16, length: int = 64, learning_rate: float = 3e-3,
                             task: str = "spans") -> Path:
    """Trains the copying network on `task` (spans, or lead: needs `tokenizer_dir`) and writes
    its checkpoint to `output_dir` (a new directory)."""
    from safetensors.torch import save_file

    config = copying_config(vocab_size, hidden_size, max(512, length))  # at least the positions trained on
    lead = LeadTask.from_tokenizer(tokenizer_dir, vocab_size) if task == "lead" else None
    tensors = train(config, steps, seed, device, batch, length, learning_rate, lead)
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
    parser.add_argument("--task", choices=("spans", "lead"), default="spans",
                        help="repeated random spans, or copying an article after summarize.py's prompt "
                             "(needs --tokenizer_dir)")
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
    if args.task == "lead" and args.tokenizer_dir is None:
        sys.exit("train_copying_checkpoint.py: error: --task lead needs --tokenizer_dir (the ids of summarize.py's "
                 "prompts), e.g. data/demo_tokenizer with --vocab_size 1024")
    try:
        write_copying_checkpoint(args.output_dir, args.steps, args.seed, args.vocab_size, args.hidden_size,
                                 args.tokenizer_dir, args.device, args.batch, args.length,
                                 args.learning_rate, args.task)
    except ValueError as error:
        sys.exit(f"train_copying_checkpoint.py: error: {error}")


if __name__ == "__main__":
    main()
