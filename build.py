"""Builds an engine directory from a Hugging Face ChatGLM2/ChatGLM3/GLM-4 checkpoint, or
from dummy weights of a model's shape when --model_dir is left out (TensorRT-LLM's build.py flags)."""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

# Light imports only up here: --help answers without loading torch (weights, engine
# writing and quantization are imported where they are used).
from glm_engine.tools.cli import missing_package  # the standard library only: imports in any Python

try:
    from glm_engine import GlmEngineError
    from glm_engine.tools.cli import LOG_LEVELS, run_tool, setup_logging
    from glm_engine.config import DTYPES, ROPE_RATIO_MODES, BuildConfig, ModelConfig
    from glm_engine.engine_format.engine_dir import check_output_dir, restore_interrupted_build
    from glm_engine.presets import CHATGLM2_6B, CHATGLM_SHAPE_FIELDS, GLM4_MODEL_NAMES, MODEL_NAMES, shape_fields
    from glm_engine.engine_format.source_files import file_inside
    from glm_engine.text.tokenizer import (ALL_TOKENIZER_FILES, CHATGLM2_SPECIAL_TOKENS, ChatGLMTokenizer,
                                           TokenizerError, load_tokenizer)
except ModuleNotFoundError as error:
    missing_package(error)

logger = logging.getLogger("build")

# Dummy-shape flag -> ChatGLM2 config.json field (glm4 presets: presets.GLM_SHAPE_FIELDS).
SHAPE_FLAGS = CHATGLM_SHAPE_FIELDS


PLUGIN_HELP = {
    "use_gpt_attention_plugin": "rotary fused with the KV-cache write and paged decode attention (Triton), decode "
                                "steps in CUDA graphs",
    "use_gemm_plugin": "decode-sized GEMMs (up to 16 rows) through the Triton skinny-GEMM kernel",
    "use_layernorm_plugin": "residual add + RMSNorm, and SwiGLU, as Triton kernels",
}
SWITCH_HELP = {
    "enable_context_fmha": "flash attention for prompts, P.V accumulated in float16 (needs the attention plugin)",
    "enable_context_fmha_fp32_acc": "flash attention for prompts, accumulated in float32 (wins over the above)",
    "use_weight_only": "quantize every decoder linear's weights (see --weight_only_precision)",
    "enable_fp8": "FP8 (E4M3) decoder linears: weights per output channel, activations per token, FP8 tensor "
                  "cores (compute capability 8.9+)",
    "fp8_kv_cache": "K/V cache in FP8 (E4M3, values saturated to +-448): twice the tokens in the same memory",
    "int8_kv_cache": "K/V cache in INT8 with a scale per layer and K/V group, calibrated on --calib_dataset: "
                     "twice the tokens in the same memory",
    "use_inflight_batching": "queue requests, max_batch_size in flight; implies the attention plugin, "
                             "--paged_kv_cache, --remove_input_padding and fp32 context FMHA",
    "paged_kv_cache": "one KV pool of blocks shared by all sequences, sized when the engine runs",
    "remove_input_padding": "run a step's prompts as one packed token stream instead of padding them",
}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_dir", type=str, default=None,
                        help="Hugging Face ChatGLM2/ChatGLM3/GLM-4 checkpoint (default: none, dummy weights)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16", help="weights and activations "
                        "(default: %(default)s)")
    parser.add_argument("--output_dir", type=str, default="trtModel",
                        help="where the engine is written (default: %(default)s)")
    parser.add_argument("--max_batch_size", type=int, default=8,
                        help="most sequences per step (default: %(default)s)")
    parser.add_argument("--max_input_len", type=int, default=1024, help="longest prompt (default: %(default)s)")
    parser.add_argument("--max_output_len", type=int, default=1024,
                        help="most generated tokens per prompt (default: %(default)s)")
    parser.add_argument("--random_seed", type=int, default=None, help="seed of dummy weights (default: 0)")
    parser.add_argument("--max_draft_len", type=int, default=0,
                        help="speculative decoding: the most draft tokens a sequence feeds one verify step "
                             "(run.py --speculative_decoding_mode); 0: none (default: %(default)s)")
    parser.add_argument("--log_level", choices=list(LOG_LEVELS), default="info",
                        help="(default: %(default)s)")
    parser.add_argument("--tokenizer_dir", type=str, default=None,
                        help="tokenizer to copy into the engine (default: the checkpoint's; for dummy weights a "
                             "small demo tokenizer that fits the vocabulary)")
    parser.add_argument("--rope_ratio_mode", choices=ROPE_RATIO_MODES, default=None,
                        help="how a checkpoint's rope_ratio applies (default: positions for ChatGLM2-32k, "
                             "base otherwise)")
    parser.add_argument("--model_name", choices=list(MODEL_NAMES), default=None,
                        help="dummy engines: the model whose config.json gives the shape, end ids and family, "
                             "the shape flags below overriding it (default: chatglm2_6b)")
    for flag, field in SHAPE_FLAGS.items():
        parser.add_argument(f"--{flag}", type=int, default=None,
                            help=f"dummy engines: {field} (default: --model_name's; ChatGLM2-6B's "
                                 f"{CHATGLM2_6B[field]})")
    parser.add_argument("--world_size", type=int, default=1,
                        help="tensor-parallel GPUs: writes one weights file per rank, run with torchrun or mpirun "
                             "(default: %(default)s)")
    parser.add_argument("--parallel_build", action="store_true", default=None,
                        help="with --world_size N > 1: convert the N ranks in N processes at once (each holds "
                             "the whole model while it converts; default: one after another)")
    for plugin, text in PLUGIN_HELP.items():
        parser.add_argument(f"--{plugin}", nargs="?", const="float16", default=None, choices=list(DTYPES),
                            help=f"{text}; the value must equal --dtype (default: off; given alone: float16)")
    for switch, text in SWITCH_HELP.items():
        parser.add_argument(f"--{switch}", action="store_true", default=None, help=f"{text} (default: off)")
    parser.add_argument("--weight_only_precision", choices=["int8", "int4", "int4_awq"], default=None,
                        help="with --use_weight_only (default: int8); int4_awq: int4 after activation-aware "
                             "scaling calibrated on --calib_dataset (group size 128 unless given)")
    parser.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                        help="INT8 SmoothQuant with migration strength ALPHA in [0, 1] (e.g. 0.5), calibrated on "
                             "--calib_dataset; needs --per_channel and --per_token (default: off)")
    parser.add_argument("--per_channel", action="store_true", default=None,
                        help="with --smoothquant: one weight scale per output channel (default: off)")
    parser.add_argument("--per_token", action="store_true", default=None,
                        help="with --smoothquant: one activation scale per token, computed as it runs (default: off)")
    parser.add_argument("--calib_dataset", type=str, default=None,
                        help="with int4_awq or --smoothquant: cnn_dailymail-style file of texts to calibrate on "
                             "(default: the bundled sample, data/cnn_dailymail_sample.jsonl)")
    parser.add_argument("--calib_size", type=int, default=None,
                        help="with int4_awq or --smoothquant: texts to calibrate on, each cut to 512 tokens "
                             "(default: 32)")
    parser.add_argument("--weight_only_group_size", type=int, default=None,
                        help="with --use_weight_only: one scale per this many input channels of each output "
                             "channel, a power of two >= 32, e.g. 128 (default: 0, one scale per output channel)")
    parser.add_argument("--tokens_per_block", type=int, default=None,
                        help="tokens per paged KV block, a power of two (default: 64)")
    return parser.parse_args(argv)


def check_supported(args: argparse.Namespace) -> None:
    """Refuses flag combinations that would do nothing."""
    if args.parallel_build and args.world_size == 1:
        raise GlmEngineError("--parallel_build converts the ranks of a --world_size N > 1 build in parallel; "
                             "add --world_size N or drop it")
    for flag in ("weight_only_precision", "weight_only_group_size"):
        if getattr(args, flag) is not None and not args.use_weight_only:
            raise GlmEngineError(f"--{flag} applies to --use_weight_only; add --use_weight_only or drop it")
    check_calibration_flags(args)
    if args.calib_size is not None and args.calib_size < 1:
        raise GlmEngineError(f"--calib_size must be positive, got {args.calib_size}")
    if args.tokens_per_block is not None and not (args.paged_kv_cache or args.use_inflight_batching):
        raise GlmEngineError("--tokens_per_block sets the paged KV cache's block size; add --paged_kv_cache")


def check_calibration_flags(args: argparse.Namespace) -> None:
    """Refuses calibration and SmoothQuant flags that would do nothing or are not built."""
    # (From the flags: this runs before the build config is made, as the other flag checks.)
    calibrated = args.smoothquant is not None or args.int8_kv_cache or (
        args.use_weight_only and args.weight_only_precision == "int4_awq")
    for flag in ("calib_dataset", "calib_size"):
        if getattr(args, flag) is not None and not calibrated:
            raise GlmEngineError(f"--{flag} calibrates --weight_only_precision int4_awq, --smoothquant or "
                                 f"--int8_kv_cache; add one or drop --{flag}")
    for flag in ("per_channel", "per_token"):
        if getattr(args, flag) and args.smoothquant is None:
            raise GlmEngineError(f"--{flag} sets SmoothQuant's scales; add --smoothquant ALPHA or drop it")
    if args.smoothquant is not None and not (args.per_channel and args.per_token):
        raise GlmEngineError("--smoothquant is built with per-channel weight and per-token activation scales only "
                             "(per-tensor static scales are not): add --per_channel --per_token")
    if calibrated and args.parallel_build:
        raise GlmEngineError("calibration runs the whole model once, and --parallel_build converts each rank in a "
                             "process of its own: drop --parallel_build")


def context_fmha(args: argparse.Namespace) -> str | None:
    """TensorRT-LLM's reading of the two flags: fp32 accumulation wins when both are given."""
    if args.enable_context_fmha_fp32_acc:
        return "enabled_with_fp32_acc"
    return "enabled" if args.enable_context_fmha else None


def serving_flags(args: argparse.Namespace) -> dict:
    """BuildConfig's serving and attention fields from the flags. As in TensorRT-LLM,
    --use_inflight_batching turns on the attention plugin (in --dtype), the paged KV
    cache and packed inputs; here also fp32-accumulating context FMHA, since its steps
    mix prompts and generated tokens, which the unfused attention would pad into one
    [sequences, longest prompt, longest context] score tensor. The flags themselves are
    recorded as given."""
    inflight = bool(args.use_inflight_batching)
    flags = {"paged_kv_cache": bool(args.paged_kv_cache) or inflight,
             "remove_input_padding": bool(args.remove_input_padding) or inflight,
             "use_inflight_batching": inflight, "use_gpt_attention_plugin": args.use_gpt_attention_plugin,
             "context_fmha": context_fmha(args)}
    if args.tokens_per_block is not None:
        flags["tokens_per_block"] = args.tokens_per_block
    if inflight and flags["use_gpt_attention_plugin"] is None:
        flags["use_gpt_attention_plugin"] = args.dtype
        logger.info("--use_inflight_batching: turning on --use_gpt_attention_plugin %s", args.dtype)
    if inflight and flags["context_fmha"] is None:
        flags["context_fmha"] = "enabled_with_fp32_acc"
        logger.info("--use_inflight_batching: turning on --enable_context_fmha_fp32_acc")
    return flags


def dummy_model_config(args: argparse.Namespace) -> ModelConfig:
    """The config of --model_name (default ChatGLM2-6B) with the shape flags' fields replaced."""
    hf_config = dict(MODEL_NAMES[args.model_name or "chatglm2_6b"])
    fields, head_size = shape_fields(hf_config)
    for flag, field in fields.items():
        if getattr(args, flag) is not None:
            if getattr(args, flag) < 1:
                raise GlmEngineError(f"--{flag} must be positive, got {getattr(args, flag)}")
            hf_config[field] = getattr(args, flag)
    hidden, heads = hf_config[fields["n_embd"]], hf_config[fields["n_head"]]
    if args.n_embd is not None or args.n_head is not None:
        if hidden % heads:
            raise GlmEngineError(f"--n_embd {hidden} must be a multiple of --n_head {heads}")
        hf_config[head_size] = hidden // heads
    ids = hf_config["eos_token_id"] if isinstance(hf_config["eos_token_id"], list) else [hf_config["eos_token_id"]]
    if max(ids + [hf_config["pad_token_id"]]) >= hf_config[fields["vocab_size"]] and args.model_name:
        # A vocabulary cut below the model's special ids: the demo tokenizer's end and pad ids.
        end_ids, pad_id = demo_end_ids(args.model_name, hf_config[fields["vocab_size"]])
        logger.info("--vocab_size %d leaves out %s's end ids: using the demo tokenizer's end ids %s and pad id %d",
                    hf_config[fields["vocab_size"]], args.model_name, end_ids, pad_id)
        hf_config.update(eos_token_id=end_ids if len(end_ids) > 1 else end_ids[0], pad_token_id=pad_id)
    from glm_engine.models import read_model_config

    return read_model_config(hf_config)


def tokenizer_files(directory: Path | None, vocab_size: int) -> list[Path]:
    """The tokenizer files to copy into the engine (regular files inside `directory`
    only), checked to fit the model's vocabulary."""
    if directory is None or not has_tokenizer_file(directory):
        return []
    files = [file_inside(directory, name, "tokenizer file") for name in ALL_TOKENIZER_FILES]
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > vocab_size:
        raise GlmEngineError(f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens, more than "
                             f"the model's vocabulary of {vocab_size}")
    return [path for path in files if path is not None]


def has_tokenizer_file(directory: Path) -> bool:
    """Whether `directory` holds tokenizer.model or tokenizer.json (each checked to lie inside it)."""
    return any(file_inside(directory, name, "tokenizer file") is not None
               for name in ("tokenizer.model", "tokenizer.json"))


def source_dirs(args: argparse.Namespace) -> dict[str, Path]:
    """The directories the build reads, which it must never write into or replace."""
    return {f"--{flag}": Path(getattr(args, flag)) for flag in ("model_dir", "tokenizer_dir")
            if getattr(args, flag)}


def build_config_of(args: argparse.Namespace) -> BuildConfig:
    return BuildConfig(dtype=args.dtype, max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
                       max_output_len=args.max_output_len, random_seed=args.random_seed,
                       world_size=args.world_size, use_layernorm_plugin=args.use_layernorm_plugin,
                       use_gemm_plugin=args.use_gemm_plugin,
                       weight_only_precision=(args.weight_only_precision or "int8") if args.use_weight_only
                       else None, weight_only_group_size=weight_only_group_size(args),
                       enable_fp8=bool(args.enable_fp8), smoothquant=args.smoothquant,
                       fp8_kv_cache=bool(args.fp8_kv_cache), int8_kv_cache=bool(args.int8_kv_cache),
                       max_draft_len=args.max_draft_len, **serving_flags(args))


def weight_only_group_size(args: argparse.Namespace) -> int:
    """--weight_only_group_size, or its default: 128 for int4_awq, else 0 (per output channel)."""
    if args.weight_only_group_size is not None:
        return args.weight_only_group_size
    return 128 if args.use_weight_only and args.weight_only_precision == "int4_awq" else 0


def model_config_of(args: argparse.Namespace) -> ModelConfig:
    """The dummy shape from the flags, or the checkpoint's config.json."""
    if args.model_dir is None:
        if args.rope_ratio_mode is not None:
            raise GlmEngineError("--rope_ratio_mode applies to a checkpoint's rope_ratio; dummy engines "
                                 "have none")
        return dummy_model_config(args)
    given = [f"--{flag}" for flag in (*SHAPE_FLAGS, "model_name") if getattr(args, flag) is not None]
    if given:
        raise GlmEngineError(f"{given[0]} sets a dummy engine's shape; a checkpoint's shape comes from "
                             "its config.json, so drop it or drop --model_dir")
    if args.random_seed is not None:
        raise GlmEngineError("--random_seed seeds dummy weights; it has no effect with --model_dir")
    from glm_engine.models import read_model_config
    from weight import load_generation_config, load_hf_config

    hf_config = load_hf_config(args.model_dir)  # first: a directory without config.json is named as such
    return read_model_config(hf_config, args.rope_ratio_mode, load_generation_config(args.model_dir))


def build(args: argparse.Namespace) -> Path:
    """Checks every input, converts the weights and writes the engine; returns its directory."""
    check_supported(args)
    output_dir, sources = Path(args.output_dir), source_dirs(args)
    check_output_dir(output_dir, sources)  # checked again when the engine moves in
    build_config = build_config_of(args)
    model_config = model_config_of(args)
    from glm_engine.engine_format.tensor_parallel import check_world_size

    check_world_size(model_config, build_config.world_size, build_config.weight_only_precision,
                     build_config.weight_only_group_size)
    check_weights_fit(model_config, build_config, build_config.world_size if args.parallel_build else 1)
    with tempfile.TemporaryDirectory() as scratch:
        files = tokenizer_files(tokenizer_source(args, model_config.vocab_size, Path(scratch)),
                                model_config.vocab_size)
        calibration = calibration_prompts_of(args, files) if build_config.calibrated else None
        return convert_and_save(args, output_dir, sources, model_config, build_config, files, calibration)


def calibration_prompts_of(args: argparse.Namespace, files: list[Path]) -> list[list[int]]:
    """The calibration texts of int4_awq or SmoothQuant (--calib_dataset, --calib_size) as
    token ids of the engine's tokenizer."""
    from glm_engine.text.dataset import BUNDLED_SAMPLE, load_articles
    from glm_engine.tools.calibration import calibration_prompts

    if not files:
        raise GlmEngineError("calibration runs on text, and this build has no tokenizer: give --tokenizer_dir")
    records = load_articles(args.calib_dataset or str(BUNDLED_SAMPLE))
    prompts = calibration_prompts(load_tokenizer(files[0].parent), [record["article"] for record in records],
                                  args.calib_size or 32)
    if not prompts:
        raise GlmEngineError(f"--calib_dataset {args.calib_dataset or BUNDLED_SAMPLE} has no text to calibrate on")
    logger.info("calibrating on %d texts (%d tokens)", len(prompts), sum(map(len, prompts)))
    return prompts


def convert_and_save(args: argparse.Namespace, output_dir: Path, sources: dict[str, Path], model_config: ModelConfig,
                     build_config: BuildConfig, files: list[Path], calibration: list[list[int]] | None = None) -> Path:
    """Converts (or makes) the weights and writes the engine, every input being checked."""
    import torch

    from glm_engine.engine_format.engine import save_engine

    restore_interrupted_build(output_dir.resolve())  # the old engine stays usable if this build fails
    if args.model_dir is None:
        logger.info("no --model_dir: building with dummy weights (seed %s)", args.random_seed)
    world_size = build_config.world_size

    def write_weights(staging: Path) -> dict[str, dict]:
        if args.parallel_build:
            logger.info("converting %d ranks in %d processes", world_size, world_size)
            return convert_ranks_in_parallel(args, model_config, build_config, staging)
        weights = convert_weights(args, model_config, build_config, progress=True, calibration=calibration)
        return dict(write_rank(weights, model_config, build_config, rank, staging, progress=True)
                    for rank in range(world_size))

    flags = {key: value for key, value in vars(args).items() if key != "log_level"}
    finish = None
    if build_config.uses_triton and not torch.cuda.is_available():
        logger.info("this engine's plugins are Triton kernels, which run on a CUDA GPU; on a machine without one "
                    "(like this one) run.py computes the same network with the reference ops")
    elif build_config.uses_triton and world_size > 1:
        logger.info("kernels are not compiled at build for a tensor-parallel engine: Triton compiles them at its "
                    "first start on each machine")
    elif build_config.uses_triton:
        finish = compile_kernels
    return save_engine(output_dir, model_config, build_config, write_weights, files, flags, sources, finish)


def compile_kernels(staging: Path) -> None:
    """Runs the finished engine once on this GPU, in a child process whose Triton cache is
    the engine's kernels/ directory, and lists what it compiled (kernels.json): the
    engine then starts without compiling on a GPU of this architecture
    (glm_engine/engine_format/kernel_cache.py). If that run fails, the engine is kept without them."""
    import multiprocessing
    import shutil

    import torch

    from glm_engine.engine_format.engine_dir import KERNELS_DIR
    from glm_engine.engine_format.kernel_cache import compile_target, write_manifest

    start = time.perf_counter()
    # A daemon: a build stopped (Ctrl-C, SIGTERM) takes it down too.
    process = multiprocessing.get_context("spawn").Process(target=run_engine_once, args=(staging,), daemon=True)
    process.start()
    process.join()
    if process.exitcode != 0:
        shutil.rmtree(staging / KERNELS_DIR, ignore_errors=True)
        logger.warning("running the engine on this GPU to compile its kernels failed (exit code %s): the engine is "
                       "written without them, and Triton compiles them at its first start", process.exitcode)
        return
    target = compile_target(torch.device("cuda"))
    count = write_manifest(staging, target)
    logger.info("compiled the engine's kernels for %s (%s, Triton %s): %d files in %.1f s", target["arch"],
                target["gpu"], target["triton"], count, time.perf_counter() - start)


def run_engine_once(engine_dir: Path) -> None:
    """In the child of compile_kernels: Triton compiles into engine_dir/kernels while the
    engine starts (the decode graphs' capture) and generates a few tokens, greedy and
    sampled, for a prompt long enough for cuBLAS and one short enough for the skinny GEMM."""
    import os

    from glm_engine.engine_format.engine_dir import KERNELS_DIR

    os.environ["TRITON_CACHE_DIR"] = str(engine_dir / KERNELS_DIR)  # before Triton is imported
    setup_logging("warning")
    from glm_engine.runtime.sampling import SamplingConfig
    from model import load_session

    session = load_session(engine_dir, device="cuda")
    build, vocab = session.build_config, session.model_config.vocab_size
    new_tokens = min(2, build.max_output_len)
    greedy = SamplingConfig(max_new_tokens=new_tokens, end_id=-1)
    sampled = SamplingConfig(max_new_tokens=new_tokens, end_id=-1, temperature=0.8, top_k=50, top_p=0.9,
                             random_seed=0)
    for length in sorted({min(40, build.max_input_len), min(5, build.max_input_len)}):
        prompt = [token % vocab for token in range(3, 3 + length)]
        for sampling in (greedy, sampled):  # requests, not a static batch: any max_batch_size takes them
            session.add_request(prompt, sampling)
        while session.has_work:
            session.step()


def convert_weights(args: argparse.Namespace, model_config: ModelConfig, build_config: BuildConfig,
                    progress: bool, calibration: list[list[int]] | None = None) -> dict:
    """The whole model's runtime-layout weights: dummy or the checkpoint's, quantized
    when asked (int4_awq and SmoothQuant: scaled first, calibrated on the `calibration`
    prompts)."""
    from glm_engine.engine_format.layout import linear_weight_names
    from glm_engine.quantization import linear_method, quantize_weights
    from weight import dummy_weights, load_hf_weights

    if args.model_dir is None:
        weights = dummy_weights(model_config, build_config.torch_dtype, args.random_seed, progress=progress)
    else:
        weights = load_hf_weights(args.model_dir, model_config, build_config.torch_dtype, progress=progress)
    if calibration is not None:
        scale_inputs(weights, model_config, build_config, calibration)
    return quantize_weights(weights, linear_weight_names(model_config), linear_method(build_config), progress)


def scale_inputs(weights: dict, model_config: ModelConfig, build_config: BuildConfig,
                 calibration: list[list[int]]) -> None:
    """The calibrated parts of a build, on the dense weights in place, calibrated on a GPU
    when there is one: the INT8 K/V cache's scales, AWQ's or SmoothQuant's input scaling."""
    import torch

    from glm_engine.quantization import linear_method
    from glm_engine.tools.calibration import kv_cache_scales, scale_for_awq, smooth_for_smoothquant

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if build_config.smoothquant is not None:
        smooth_for_smoothquant(weights, model_config, calibration, build_config.smoothquant, device)
        logger.info("SmoothQuant: smoothed the linears on %s (alpha %s)", device, build_config.smoothquant)
    elif build_config.weight_only_precision == "int4_awq":
        alphas = scale_for_awq(weights, model_config, calibration, linear_method(build_config), device)
        logger.info("int4_awq: scaled %d linears on %s (alpha median %.2f)", len(alphas), device,
                    sorted(alphas.values())[len(alphas) // 2])
    if build_config.int8_kv_cache:  # last: on the network as it will run
        weights.update(kv_cache_scales(weights, model_config, calibration, device))
        logger.info("INT8 K/V cache: scales calibrated on %s", device)


def write_rank(weights: dict, model_config: ModelConfig, build_config: BuildConfig, rank: int, staging: Path,
               progress: bool) -> tuple[str, dict]:
    """Writes rank `rank`'s slice of the weights into the staging directory."""
    from glm_engine.engine_format.engine import write_rank_file
    from glm_engine.engine_format.tensor_parallel import split_weights

    return write_rank_file(staging, rank, split_weights(weights, model_config, build_config.world_size, rank),
                           progress)


def convert_rank(args: argparse.Namespace, model_config: ModelConfig, build_config: BuildConfig, rank: int,
                 staging: Path) -> tuple[str, dict]:
    """One --parallel_build process: converts the whole model, writes rank `rank`'s file."""
    setup_logging(args.log_level if rank == 0 else "warning")
    weights = convert_weights(args, model_config, build_config, progress=rank == 0)
    return write_rank(weights, model_config, build_config, rank, staging, progress=rank == 0)


def convert_ranks_in_parallel(args: argparse.Namespace, model_config: ModelConfig, build_config: BuildConfig,
                              staging: Path) -> dict[str, dict]:
    """--parallel_build: one spawned process per rank (the conversion is CPU work; the
    file bytes equal a serial build's). A failure or SIGTERM stops every process."""
    import multiprocessing

    world_size = build_config.world_size
    with multiprocessing.get_context("spawn").Pool(world_size) as pool:  # leaving the block terminates them
        written = pool.starmap(convert_rank, [(args, model_config, build_config, rank, staging)
                                              for rank in range(world_size)])
    return dict(written)


def glm4_demo_tokenizer(model_name: str | None, vocab_size: int) -> Path | None:
    """The bundled GLM-4 demo tokenizer, for a dummy GLM-4 engine whose vocabulary holds it."""
    from scripts.make_demo_tokenizer import GLM4_BUNDLED_DIR

    if model_name not in GLM4_MODEL_NAMES or load_tokenizer(GLM4_BUNDLED_DIR).vocab_size > vocab_size:
        return None
    return GLM4_BUNDLED_DIR


def demo_end_ids(model_name: str, vocab_size: int) -> tuple[list[int], int]:
    """(end ids, pad id) of the demo tokenizer a dummy engine of `model_name` gets: GLM-4's
    <|endoftext|>, <|user|> and <|observation|> (pad: <|endoftext|>), or ChatGLM2's 2 (pad 0)."""
    directory = glm4_demo_tokenizer(model_name, vocab_size)
    if directory is None:
        return [2], 0
    specials = load_tokenizer(directory).special_token_ids
    return [specials[name] for name in ("<|endoftext|>", "<|user|>", "<|observation|>")], specials["<|endoftext|>"]


def tokenizer_source(args: argparse.Namespace, vocab_size: int, scratch: Path) -> Path | None:
    """Where the engine's tokenizer comes from, logged: --tokenizer_dir, the checkpoint's,
    or for dummy weights the demo tokenizer (bundled, or trained into `scratch` to fit
    a smaller vocabulary)."""
    if args.tokenizer_dir:
        directory = Path(args.tokenizer_dir)
        if not has_tokenizer_file(directory):
            raise GlmEngineError(f"--tokenizer_dir {directory} holds no tokenizer.model or tokenizer.json")
        logger.info("tokenizer: --tokenizer_dir %s", directory)
        return directory
    if args.model_dir:
        has_one = has_tokenizer_file(Path(args.model_dir))
        logger.info("tokenizer: %s", "the checkpoint's" if has_one else "none (the checkpoint has no tokenizer.model "
                    "or tokenizer.json; give run.py --tokenizer_dir or --input_tokens)")
        return Path(args.model_dir)
    from scripts.make_demo_tokenizer import BUNDLED_DIR, train_demo_tokenizer

    glm4 = glm4_demo_tokenizer(args.model_name, vocab_size)
    if glm4 is not None:
        logger.info("tokenizer: the bundled GLM-4 demo tokenizer (%s; dummy weights print random text)", glm4)
        return glm4
    if ChatGLMTokenizer.from_dir(BUNDLED_DIR).vocab_size <= vocab_size:
        logger.info("tokenizer: the bundled demo tokenizer (%s; dummy weights print random text)", BUNDLED_DIR)
        return BUNDLED_DIR
    try:
        directory = train_demo_tokenizer(scratch, sp_vocab_size=vocab_size - len(CHATGLM2_SPECIAL_TOKENS))
    except TokenizerError:
        logger.info("tokenizer: none fits a vocabulary of %d tokens; give run.py --input_tokens", vocab_size)
        return None
    logger.info("tokenizer: a demo tokenizer trained to fit the vocabulary of %d tokens", vocab_size)
    return directory


def check_weights_fit(model_config: ModelConfig, build_config: BuildConfig, copies: int) -> None:
    """The weights are converted in host memory (`copies` processes at once, each with
    the whole model): refuse a shape that cannot fit."""
    import torch

    from glm_engine.engine_format.layout import parameter_bytes
    from glm_engine.runtime.memory import check_fits

    check_fits(f"the engine's weights ({model_config.num_layers} layers, hidden size "
               f"{model_config.hidden_size}, vocabulary {model_config.vocab_size}, {build_config.dtype})",
               copies * parameter_bytes(model_config, build_config), torch.device("cpu"),
               "choose a smaller shape or --dtype, or build on a machine with more memory"
               + (", or drop --parallel_build" if copies > 1 else ""))


def main() -> None:
    args = parse_arguments()
    setup_logging(args.log_level)
    start = time.perf_counter()
    engine_dir = build(args)
    logger.info("engine written to %s in %.1f s", engine_dir, time.perf_counter() - start)


if __name__ == "__main__":
    run_tool(main)
