"""ModelConfig (the network's shape, read from a checkpoint's config.json by its
family in glm_engine/models) and BuildConfig (the build flags an engine was made with)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from glm_engine import GlmEngineError

# The engine dtypes, by torch's names (torch itself is imported only when a dtype is
# used, so that the tools answer --help without loading it).
DTYPES = ("float16", "bfloat16", "float32")

ROPE_RATIO_MODES = ("positions", "base")
MAX_SEED = 2**64 - 1  # seeds are unsigned 64-bit, as TensorRT-LLM's
MAX_SEQUENCE_LEN = 2**31 - 1  # context lengths and block indices are int32 in the kernels
MAX_DRAFT_LEN = 64  # past it a verify step is a prompt step: no longer nearly free at batch 1


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_field_types(owner: str, config: Any, integers: tuple[str, ...], numbers: tuple[str, ...] = (),
                      flags: tuple[str, ...] = ()) -> None:
    """Raises GlmEngineError naming the first field of the wrong type: integers must be
    ints (64.0 is refused), numbers finite ints or floats, flags true or false."""
    for names, check, kind in ((integers, is_integer, "an integer"), (numbers, is_finite_number, "a finite number"),
                               (flags, lambda value: isinstance(value, bool), "true or false")):
        for name in names:
            value = getattr(config, name)
            if not check(value):
                raise GlmEngineError(f"{owner}: {name} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A GLM network's shape and constants."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    kv_channels: int  # head dimension
    multi_query_group_num: int  # number of K/V heads
    ffn_hidden_size: int
    vocab_size: int  # padded_vocab_size
    seq_length: int
    layernorm_epsilon: float = 1e-5
    add_qkv_bias: bool = True
    # Long-context checkpoints (ChatGLM2-6B-32k, ChatGLM3-6B-32k, GLM-4) set
    # rope_ratio; public code applies it two ways: ChatGLM2-6B-32k divides the
    # positions by it ("positions"), ChatGLM3-6B-32k and GLM-4 multiply the
    # rotary base by it ("base").
    rope_ratio: float = 1.0
    rope_ratio_mode: str = "positions"
    rope_base: float = 10000.0
    eos_token_id: int = 2
    pad_token_id: int = 0
    model_type: str = "chatglm"  # the family (glm_engine/models) that computes it
    # Every id that ends a generation (config.json's and generation_config.json's);
    # eos_token_id is the first. Empty: eos_token_id alone.
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        sizes = ("num_layers", "hidden_size", "num_attention_heads", "kv_channels", "multi_query_group_num",
                 "ffn_hidden_size", "vocab_size", "seq_length")
        check_field_types("model config", self, sizes + ("eos_token_id", "pad_token_id"),
                          ("layernorm_epsilon", "rope_ratio", "rope_base"), ("add_qkv_bias",))
        for name in sizes:
            if getattr(self, name) <= 0:
                raise GlmEngineError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if not isinstance(self.model_type, str):
            raise GlmEngineError(f"model config: model_type must be a string, got {self.model_type!r}")
        if self.num_attention_heads % self.multi_query_group_num:
            raise GlmEngineError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"multi_query_group_num ({self.multi_query_group_num})")
        if self.kv_channels % 4:
            raise GlmEngineError(f"model config: kv_channels ({self.kv_channels}) must be a multiple of 4 "
                                 "(rotary acts on pairs in the first half of each head)")
        if self.rope_ratio_mode not in ROPE_RATIO_MODES:
            raise GlmEngineError(f"model config: rope_ratio_mode must be one of {ROPE_RATIO_MODES}, "
                                 f"got {self.rope_ratio_mode!r}")
        for name in ("eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise GlmEngineError(f"model config: {name} {getattr(self, name)} is outside the vocabulary "
                                     f"[0, {self.vocab_size})")
        self._check_end_ids()
        for name in ("rope_ratio", "rope_base", "layernorm_epsilon"):
            if getattr(self, name) <= 0:
                raise GlmEngineError(f"model config: {name} must be positive, got {getattr(self, name)}")

    def _check_end_ids(self) -> None:
        """eos_token_ids: integers in the vocabulary, eos_token_id first (a list from JSON becomes a tuple)."""
        ids = self.eos_token_ids
        if not isinstance(ids, (tuple, list)) or not all(is_integer(token) for token in ids):
            raise GlmEngineError(f"model config: eos_token_ids must be a list of integers, got {ids!r}")
        # The field is frozen: a list read from JSON is stored as the tuple it stands for.
        object.__setattr__(self, "eos_token_ids", tuple(ids) or (self.eos_token_id,))
        if self.eos_token_ids[0] != self.eos_token_id:
            raise GlmEngineError(f"model config: eos_token_ids {list(self.eos_token_ids)} must start with "
                                 f"eos_token_id {self.eos_token_id}")
        outside = [token for token in self.eos_token_ids if not 0 <= token < self.vocab_size]
        if outside:
            raise GlmEngineError(f"model config: end id {outside[0]} is outside the vocabulary [0, {self.vocab_size})")

    def end_options(self, num_beams: int = 1) -> dict:
        """SamplingConfig's end_id and stop_token_ids for this model: its first end id, and
        the others as stop tokens (GLM-4 also ends at <|user|> and <|observation|>). Beam
        search takes one end id."""
        return {"end_id": self.eos_token_id, "stop_token_ids": self.eos_token_ids[1:] if num_beams == 1 else ()}

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_size(self) -> int:
        return self.multi_query_group_num * self.kv_channels

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def rotary_dim(self) -> int:
        """ChatGLM2 rotates the first half of each head."""
        return self.kv_channels // 2

    @property
    def rotary_base(self) -> float:
        if self.rope_ratio_mode == "base":
            return self.rope_base * self.rope_ratio
        return self.rope_base

    @property
    def position_scale(self) -> float:
        """Factor the positions are multiplied by before the rotary angles."""
        return 1.0 / self.rope_ratio if self.rope_ratio_mode == "positions" else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "eos_token_ids": list(self.eos_token_ids)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        if isinstance(values, dict) and "model_type" not in values:
            values = {**values, "model_type": "chatglm"}  # written before there were several families
        if isinstance(values, dict) and "eos_token_ids" not in values:
            values = {**values, "eos_token_ids": []}  # written before every end id was kept: eos_token_id alone
        return cls(**_dataclass_fields(cls, values, "model"))


def _dataclass_fields(cls: type, values: Any, section: str) -> dict[str, Any]:
    """`values` checked to hold exactly the fields of `cls`, which then check their types."""
    names = {field.name for field in dataclasses.fields(cls)}
    if not isinstance(values, dict):
        raise GlmEngineError(f"the engine's {section} config is a {type(values).__name__}, not an object")
    unknown, missing = sorted(set(values) - names), sorted(names - set(values))
    if unknown or missing:
        what = f"unknown field {unknown[0]!r}" if unknown else f"no field {missing[0]!r}"
        raise GlmEngineError(f"the engine's {section} config has {what}")
    return values


def vocab_rows_per_rank(config: ModelConfig, world_size: int) -> int:
    """Rows of the output layer each of `world_size` tensor-parallel ranks holds."""
    return -(-config.vocab_size // world_size)


KV_CACHE_SCALE = "self_attention.kv_cache_scale"


def kv_cache_scale_name(layer: int) -> str:
    """The engine tensor of layer `layer`'s INT8 K/V cache scales: [2, groups] float32, the
    keys' then the values' scale of each K/V group."""
    return f"layers.{layer}.{KV_CACHE_SCALE}"


@dataclass(frozen=True)
class BuildConfig:
    """The build flags that change the engine."""

    dtype: str = "float16"
    max_batch_size: int = 8
    max_input_len: int = 1024
    max_output_len: int = 1024
    random_seed: int | None = None  # dummy weights only
    world_size: int = 1
    # Plugins, as in TensorRT-LLM: the dtype they compute in, or None when off.
    use_gpt_attention_plugin: str | None = None
    use_layernorm_plugin: str | None = None
    use_gemm_plugin: str | None = None
    # int8, int4 or int4_awq (int4 after activation-aware scaling) with --use_weight_only, None without
    weight_only_precision: str | None = None
    # Input channels per weight scale (--weight_only_group_size); 0: one scale per output channel.
    weight_only_group_size: int = 0
    # FP8 (E4M3) decoder linears (--enable_fp8): weights with per-channel scales, activations
    # quantized per token as each linear reads them.
    enable_fp8: bool = False
    # INT8 SmoothQuant (--smoothquant ALPHA --per_channel --per_token): the migration strength
    # alpha of the smoothing folded in at build; int8 weights per output channel, activations
    # quantized to int8 per token as each linear reads them. None: off.
    smoothquant: float | None = None
    # K/V cache in FP8 E4M3 (--fp8_kv_cache): one byte a value, saturated to +-448, unscaled;
    # or in INT8 (--int8_kv_cache) with a scale per layer, K/V and group from calibration.
    fp8_kv_cache: bool = False
    int8_kv_cache: bool = False
    # Context FMHA as TensorRT-LLM names it: "enabled" (float16 accumulation of P.V
    # in float16 engines), "enabled_with_fp32_acc", or None (the unfused reference).
    context_fmha: str | None = None
    # Serving (issue 4). Without paged_kv_cache the pool holds a full sequence per
    # batch row; with it, the pool is sized at run time and shared by all sequences.
    paged_kv_cache: bool = False
    tokens_per_block: int = 64
    remove_input_padding: bool = False  # pack prompts into one stream instead of padding to the longest
    use_inflight_batching: bool = False  # the tools feed requests through the scheduler's queue
    # Speculative decoding (--max_draft_len): the most draft tokens a sequence feeds a verify
    # step, whose shapes the engine captures as CUDA graphs; 0: no speculative decoding.
    max_draft_len: int = 0

    def __post_init__(self) -> None:
        check_field_types("build config", self, ("max_batch_size", "max_input_len", "max_output_len",
                                                 "world_size", "tokens_per_block", "weight_only_group_size",
                                                 "max_draft_len"),
                          flags=("paged_kv_cache", "remove_input_padding", "use_inflight_batching", "enable_fp8",
                                 "fp8_kv_cache", "int8_kv_cache"))
        if self.random_seed is not None and not (is_integer(self.random_seed) and 0 <= self.random_seed <= MAX_SEED):
            raise GlmEngineError(f"--random_seed must be an integer in [0, 2**64), got {self.random_seed!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise GlmEngineError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.weight_only_precision not in (None, "int8", "int4", "int4_awq"):
            raise GlmEngineError(f"--weight_only_precision must be int8, int4 or int4_awq, got "
                                 f"{self.weight_only_precision!r}")
        group = self.weight_only_group_size
        if group and (group < 32 or group & (group - 1)):
            raise GlmEngineError(f"--weight_only_group_size must be 0 (per output channel) or a power of two of at "
                                 f"least 32, got {group}")
        if self.weight_only_precision == "int4_awq" and not group:
            raise GlmEngineError("int4_awq scales and quantizes per group of input channels: set "
                                 "--weight_only_group_size (e.g. 128)")
        if group and self.weight_only_precision is None:
            raise GlmEngineError("--weight_only_group_size applies to --use_weight_only; add --use_weight_only or "
                                 "drop it")
        schemes = [flag for flag, on in (("--enable_fp8", self.enable_fp8), ("--smoothquant", self.smoothquant
                   is not None), ("--use_weight_only", self.weight_only_precision is not None)) if on]
        if len(schemes) > 1:
            raise GlmEngineError(f"{schemes[0]} and {schemes[1]} are two ways to store the decoder linears; pick one")
        if self.fp8_kv_cache and self.int8_kv_cache:
            raise GlmEngineError("--fp8_kv_cache and --int8_kv_cache are two K/V cache formats; pick one")
        if self.smoothquant is not None and not (is_finite_number(self.smoothquant) and 0 <= self.smoothquant <= 1):
            raise GlmEngineError(f"--smoothquant takes the migration strength alpha in [0, 1], got "
                                 f"{self.smoothquant!r}")
        for plugin in ("use_gpt_attention_plugin", "use_layernorm_plugin", "use_gemm_plugin"):
            value = getattr(self, plugin)
            if value is not None and value != self.dtype:
                raise GlmEngineError(f"--{plugin} {value} with --dtype {self.dtype}: the kernels compute in the "
                                     f"engine's dtype; pass --{plugin} {self.dtype}")
        if self.context_fmha not in (None, "enabled", "enabled_with_fp32_acc"):
            raise GlmEngineError(f"context_fmha must be enabled or enabled_with_fp32_acc, got {self.context_fmha!r}")
        if self.context_fmha is not None and self.use_gpt_attention_plugin is None:
            raise GlmEngineError("context FMHA runs inside the GPT attention plugin; add --use_gpt_attention_plugin "
                                 f"{self.dtype} or drop --enable_context_fmha")
        if self.tokens_per_block < 1 or self.tokens_per_block & (self.tokens_per_block - 1):
            raise GlmEngineError(f"--tokens_per_block must be a power of two, got {self.tokens_per_block}")
        if self.use_inflight_batching and not (self.paged_kv_cache and self.remove_input_padding
                                               and self.use_gpt_attention_plugin):
            raise GlmEngineError("in-flight batching needs the attention plugin, the paged KV cache and packed "
                                 "inputs; build with --use_inflight_batching alone to turn them all on")
        if not 0 <= self.max_draft_len <= MAX_DRAFT_LEN:
            raise GlmEngineError(f"--max_draft_len must be within [0, {MAX_DRAFT_LEN}], got {self.max_draft_len}")
        for name in ("max_batch_size", "max_input_len", "max_output_len", "world_size"):
            if getattr(self, name) <= 0:
                raise GlmEngineError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.max_sequence_len > MAX_SEQUENCE_LEN or self.tokens_per_block > MAX_SEQUENCE_LEN:
            raise GlmEngineError(f"--max_input_len + --max_output_len ({self.max_sequence_len}) and "
                                 f"--tokens_per_block must stay under 2**31: the kernels count a sequence's "
                                 "tokens in 32-bit integers")

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.dtype)

    @property
    def uses_triton(self) -> bool:
        """Whether any op of the engine is a Triton kernel (FP8, SmoothQuant: the per-token
        activation quantizer)."""
        return self.enable_fp8 or any(value is not None for value in (
            self.use_gpt_attention_plugin, self.use_layernorm_plugin, self.use_gemm_plugin, self.weight_only_precision,
            self.smoothquant))

    @property
    def calibrated(self) -> bool:
        """Whether the build runs the dense network over calibration text (AWQ, SmoothQuant,
        an INT8 K/V cache's scales)."""
        return self.weight_only_precision == "int4_awq" or self.smoothquant is not None or self.int8_kv_cache

    @property
    def max_sequence_len(self) -> int:
        return self.max_input_len + self.max_output_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BuildConfig":
        if isinstance(values, dict) and "weight_only_group_size" not in values:
            # Written before the flag existed: such an engine's scales are per output channel.
            values = {**values, "weight_only_group_size": 0}
        if isinstance(values, dict) and "enable_fp8" not in values:
            values = {**values, "enable_fp8": False}  # written before FP8 engines existed
        if isinstance(values, dict) and "smoothquant" not in values:
            values = {**values, "smoothquant": None}  # written before SmoothQuant engines existed
        if isinstance(values, dict) and "fp8_kv_cache" not in values:
            values = {**values, "fp8_kv_cache": False}  # written before FP8 K/V caches existed
        if isinstance(values, dict) and "int8_kv_cache" not in values:
            values = {**values, "int8_kv_cache": False}
        return cls(**_dataclass_fields(cls, values, "build"))
