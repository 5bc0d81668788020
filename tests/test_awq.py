"""int4_awq engines (build.py --use_weight_only --weight_only_precision int4_awq):
activation-aware scaling calibrated on text, on a checkpoint with activation outliers."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_SHAPE_FLAGS, assert_one_line_error, run_tool
from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig
from glm_engine.engine_format.engine import Engine, load_engine
from glm_engine.quantization import dequantize_weights
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.tools.compare import relative_error
from model import load_session
from test_model import build_engine, random_prompt

GROUP = ["--weight_only_group_size", "32"]


def test_awq_is_closer_to_the_dense_model_than_round_to_nearest(outlier_checkpoint, tmp_path):
    dense = build_engine(outlier_checkpoint, tmp_path / "dense")
    rounded = build_engine(outlier_checkpoint, tmp_path / "rtn", "float32", "--use_weight_only",
                           "--weight_only_precision", "int4", *GROUP)
    awq = build_engine(outlier_checkpoint, tmp_path / "awq", "float32", "--use_weight_only",
                       "--weight_only_precision", "int4_awq", *GROUP)
    errors = []
    for seed in range(3):
        prompt = random_prompt(30, seed)
        reference = dense.prompt_logits(prompt)
        errors.append((relative_error(awq.prompt_logits(prompt), reference),
                       relative_error(rounded.prompt_logits(prompt), reference)))
    awq_error, rtn_error = (sum(column) / len(errors) for column in zip(*errors))
    assert awq_error < 0.8 * rtn_error, errors


def test_awq_engine_equals_the_network_on_its_dequantized_weights(outlier_checkpoint, tmp_path):
    """Its tokens are the unquantized network's on the scaled, quantized-then-dequantized
    weights (the folded norms included): the runtime is int4 g32's."""
    awq = build_engine(outlier_checkpoint, tmp_path / "awq", "float32", "--use_weight_only",
                       "--weight_only_precision", "int4_awq", *GROUP)
    engine = load_engine(tmp_path / "awq")
    assert engine.build_config.weight_only_precision == "int4_awq"
    assert engine.build_config.weight_only_group_size == 32
    oracle = load_session(Engine(tmp_path, engine.model_config, BuildConfig(dtype="float32", max_input_len=64,
                                                                           max_output_len=32),
                                 dequantize_weights(engine.weights, torch.float32)), "cpu")
    prompts = [random_prompt(length, seed) for seed, length in enumerate([6, 19, 2])]
    sampling = SamplingConfig(max_new_tokens=12, end_id=-1)
    assert awq.generate(prompts, sampling) == oracle.generate(prompts, sampling)


def test_awq_scaling_keeps_the_dense_function(outlier_checkpoint, tmp_path):
    """The scales folded into the norms and up rows undo those of the linears' columns."""
    from glm_engine.quantization import WeightOnly
    from glm_engine.tools.calibration import scale_for_awq

    build_engine(outlier_checkpoint, tmp_path / "dense")
    engine = load_engine(tmp_path / "dense")
    scaled = dict(engine.weights)
    prompts = [random_prompt(40, seed) for seed in range(4)]
    alphas = scale_for_awq(scaled, engine.model_config, prompts, WeightOnly("int4_awq", 32), torch.device("cpu"))
    assert any(alpha > 0 for alpha in alphas.values())  # the outliers are worth scaling for
    changed = [name for name in scaled if not torch.equal(scaled[name], engine.weights[name])]
    assert changed
    build = BuildConfig(dtype="float32", max_input_len=64, max_output_len=32)
    original = load_session(Engine(tmp_path, engine.model_config, build, engine.weights), "cpu")
    rescaled = load_session(Engine(tmp_path, engine.model_config, build, scaled), "cpu")
    prompt = random_prompt(25, 7)
    assert relative_error(rescaled.prompt_logits(prompt), original.prompt_logits(prompt)) < 1e-5


@pytest.mark.parametrize("flags, message", [
    (["--calib_size", "8"], "--calib_size calibrates --weight_only_precision int4_awq"),
    (["--use_weight_only", "--weight_only_precision", "int4", "--calib_dataset", "x.jsonl"],
     "--calib_dataset calibrates"),
    (["--use_weight_only", "--weight_only_precision", "int4_awq", "--calib_size", "0"], "--calib_size must be"),
    (["--use_weight_only", "--weight_only_precision", "int4_awq", "--world_size", "2", "--parallel_build"],
     "drop --parallel_build"),
])
def test_calibration_flags_are_checked(tmp_path, flags, message):
    result = run_tool("build.py", "--output_dir", tmp_path / "engine", *TINY_SHAPE_FLAGS, *flags)
    assert_one_line_error(result, message)
    assert not (tmp_path / "engine").exists()


def test_a_calibration_file_without_text_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"article": "", "highlights": ""}\n')
    result = run_tool("build.py", "--output_dir", tmp_path / "engine", *TINY_SHAPE_FLAGS, "--use_weight_only",
                      "--weight_only_precision", "int4_awq", "--weight_only_group_size", "32", "--calib_dataset", empty)
    assert_one_line_error(result, "has no text to calibrate on")


def test_awq_needs_a_group_size():
    with pytest.raises(GlmEngineError, match="int4_awq scales and quantizes per group"):
        BuildConfig(weight_only_precision="int4_awq")
