"""The launch table (glm_engine/kernels/launch_configs.json) and its loader
(launch_configs.py): on sm_90 the kernels make exactly the choices they made before the
table for ChatGLM2-6B's shapes (a frozen copy below); shapes and architectures it does
not list take the default; benchmarks/tune_gemv.py merges what it measured into it."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch

from conftest import REPO_ROOT
from glm_engine.kernels import gemv, launch_configs, weight_only_mma
from glm_engine.kernels.gemv import GemvConfig

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import tune_gemv  # noqa: E402
import tune_int8_gemm  # noqa: E402

FMA_4 = GemvConfig(4, 512, 1, use_dot=False)
FMA_8 = GemvConfig(8, 512, 1, use_dot=False)
DOT_32X512 = GemvConfig(32, 512, 1, use_dot=True)
DOT_SPLIT_2 = GemvConfig(32, 256, 2, use_dot=True)
DOT_SPLIT_4 = GemvConfig(32, 256, 4, use_dot=True)
HALF2_4 = GemvConfig(4, 1024, 1, use_dot=False, half2=True)
HALF2_8 = GemvConfig(8, 1024, 1, use_dot=False, half2=True)
HALF2_32 = GemvConfig(32, 512, 1, use_dot=False, half2=True)
HALF2_4_SPLIT_2 = GemvConfig(4, 1024, 2, use_dot=False, half2=True)

# gemv.default_config's choices before the table (commit 918e490), ChatGLM2-6B at world size 1
# (qkv, dense, up, down, output layer) and 2 (each rank's half):
# (n, k, bits, grouped): (one row, half2 possible; one row; two rows; each of 3-16 rows).
GEMV_SM90 = {
    (4608, 4096, 0, False): (None, FMA_4, FMA_8, DOT_32X512),
    (4608, 4096, 8, False): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (4608, 4096, 8, True): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (4608, 4096, 4, False): (HALF2_8, FMA_8, FMA_8, DOT_SPLIT_2),
    (4608, 4096, 4, True): (HALF2_8, FMA_8, FMA_8, DOT_SPLIT_4),
    (4096, 4096, 0, False): (None, FMA_4, FMA_8, DOT_32X512),
    (4096, 4096, 8, False): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (4096, 4096, 8, True): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (4096, 4096, 4, False): (HALF2_8, FMA_8, FMA_8, DOT_SPLIT_2),
    (4096, 4096, 4, True): (HALF2_8, FMA_8, FMA_8, DOT_SPLIT_4),
    (27392, 4096, 0, False): (None, FMA_4, DOT_32X512, DOT_32X512),
    (27392, 4096, 8, False): (HALF2_4, DOT_SPLIT_4, DOT_SPLIT_4, DOT_SPLIT_4),
    (27392, 4096, 8, True): (HALF2_4, DOT_SPLIT_4, DOT_SPLIT_4, DOT_SPLIT_4),
    (27392, 4096, 4, False): (HALF2_32, FMA_8, DOT_SPLIT_2, DOT_SPLIT_2),
    (27392, 4096, 4, True): (HALF2_4_SPLIT_2, FMA_8, DOT_SPLIT_2, DOT_SPLIT_2),
    (4096, 13696, 0, False): (None, FMA_4, DOT_32X512, DOT_32X512),
    (4096, 13696, 8, False): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (4096, 13696, 8, True): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (4096, 13696, 4, False): (HALF2_4, FMA_8, DOT_SPLIT_2, DOT_SPLIT_2),
    (4096, 13696, 4, True): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (65024, 4096, 0, False): (None, FMA_4, DOT_32X512, DOT_32X512),
    (65024, 4096, 8, False): (HALF2_4, DOT_SPLIT_4, DOT_SPLIT_4, DOT_SPLIT_4),
    (65024, 4096, 8, True): (HALF2_4, DOT_SPLIT_4, DOT_SPLIT_4, DOT_SPLIT_4),
    (65024, 4096, 4, False): (HALF2_32, FMA_8, DOT_SPLIT_2, DOT_SPLIT_2),
    (65024, 4096, 4, True): (HALF2_4_SPLIT_2, FMA_8, DOT_SPLIT_2, DOT_SPLIT_2),
    (2304, 4096, 0, False): (None, FMA_4, FMA_8, DOT_32X512),
    (2304, 4096, 8, False): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (2304, 4096, 8, True): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (2304, 4096, 4, False): (HALF2_4, FMA_8, FMA_8, DOT_SPLIT_2),
    (2304, 4096, 4, True): (HALF2_4, FMA_8, FMA_8, DOT_SPLIT_4),
    (4096, 2048, 0, False): (None, FMA_4, FMA_8, DOT_32X512),
    (4096, 2048, 8, False): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (4096, 2048, 8, True): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (4096, 2048, 4, False): (HALF2_8, FMA_8, FMA_8, DOT_SPLIT_2),
    (4096, 2048, 4, True): (HALF2_8, FMA_8, FMA_8, DOT_SPLIT_4),
    (13696, 4096, 0, False): (None, FMA_4, DOT_32X512, DOT_32X512),
    (13696, 4096, 8, False): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (13696, 4096, 8, True): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (13696, 4096, 4, False): (HALF2_8, FMA_8, DOT_SPLIT_2, DOT_SPLIT_2),
    (13696, 4096, 4, True): (HALF2_8, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (4096, 6848, 0, False): (None, FMA_4, DOT_32X512, DOT_32X512),
    (4096, 6848, 8, False): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (4096, 6848, 8, True): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (4096, 6848, 4, False): (HALF2_4, FMA_8, DOT_SPLIT_2, DOT_SPLIT_2),
    (4096, 6848, 4, True): (HALF2_4, FMA_8, DOT_SPLIT_4, DOT_SPLIT_4),
    (32512, 4096, 0, False): (None, FMA_4, DOT_32X512, DOT_32X512),
    (32512, 4096, 8, False): (HALF2_4, DOT_SPLIT_4, DOT_SPLIT_4, DOT_SPLIT_4),
    (32512, 4096, 8, True): (HALF2_4, DOT_SPLIT_4, DOT_SPLIT_4, DOT_SPLIT_4),
    (32512, 4096, 4, False): (HALF2_32, FMA_8, DOT_SPLIT_2, DOT_SPLIT_2),
    (32512, 4096, 4, True): (HALF2_4_SPLIT_2, FMA_8, DOT_SPLIT_2, DOT_SPLIT_2),
}
SHAPES = list(dict.fromkeys((n, k) for n, k, _, _ in GEMV_SM90))

# gemv.cublas_is_faster before the table: true for these (n, k, bits) at 2-16 rows, nowhere else.
CUBLAS_SM90 = {(4608, 4096, 0), (4096, 2048, 0)}

# weight_only_mma.launch_config before the table: (n, k, bits): (without SwiGLU, with SwiGLU on the up projections).
MMA_SM90 = {
    (4608, 4096, 4): ((16, 1, 1), None),
    (4608, 4096, 8): ((16, 1, 1), None),
    (4608, 4096, 16): ((8, 2, 0), None),
    (4096, 4096, 4): ((16, 1, 1), None),
    (4096, 4096, 8): ((16, 1, 1), None),
    (4096, 4096, 16): ((8, 2, 0), None),
    (27392, 4096, 4): ((8, 1, 0), (4, 2, 1)),
    (27392, 4096, 8): ((8, 1, 0), (4, 1, 1)),
    (27392, 4096, 16): ((8, 2, 0), (4, 1, 0)),
    (4096, 13696, 4): ((16, 2, 1), None),
    (4096, 13696, 8): ((16, 2, 1), None),
    (4096, 13696, 16): ((8, 2, 0), None),
    (65024, 4096, 4): ((8, 1, 0), None),
    (65024, 4096, 8): ((8, 1, 0), None),
    (65024, 4096, 16): ((8, 2, 0), None),
    (2304, 4096, 4): ((16, 1, 1), None),
    (2304, 4096, 8): ((16, 1, 1), None),
    (2304, 4096, 16): ((8, 2, 0), None),
    (4096, 2048, 4): ((16, 1, 1), None),
    (4096, 2048, 8): ((16, 1, 1), None),
    (4096, 2048, 16): ((8, 2, 0), None),
    (13696, 4096, 4): ((16, 1, 1), (8, 1, 0)),
    (13696, 4096, 8): ((16, 1, 1), (8, 1, 0)),
    (13696, 4096, 16): ((8, 2, 0), (4, 1, 0)),
    (4096, 6848, 4): ((16, 1, 1), None),
    (4096, 6848, 8): ((16, 1, 1), None),
    (4096, 6848, 16): ((8, 2, 0), None),
    (32512, 4096, 4): ((8, 1, 0), None),
    (32512, 4096, 8): ((8, 1, 0), None),
    (32512, 4096, 16): ((8, 2, 0), None),
}

# The default: the choices before the table for a shape none of their special cases covered.
# (bits, grouped): (one row, half2 possible; one row; each of 2-16 rows).
GEMV_DEFAULT = {
    (0, False): (None, FMA_4, DOT_32X512),
    (8, False): (HALF2_4, FMA_8, DOT_SPLIT_4),
    (8, True): (HALF2_4, FMA_8, DOT_SPLIT_4),
    (4, False): (HALF2_8, FMA_8, DOT_SPLIT_2),
    (4, True): (HALF2_8, FMA_8, DOT_SPLIT_4),
}
MMA_DEFAULT = {(4, False): (16, 1, 1), (4, True): (8, 1, 0), (8, False): (16, 1, 1), (8, True): (8, 1, 0),
               (16, False): (8, 2, 0), (16, True): (4, 1, 0)}


def gemv_choices(arch: str | None, n: int, k: int, bits: int, grouped: bool) -> list[GemvConfig | None]:
    """default_config at one row with half2 possible (None on fp16), then at each of 1-16 rows."""
    half2 = gemv.default_config(1, n, k, bits, True, grouped, arch=arch) if bits else None
    return [half2] + [gemv.default_config(rows, n, k, bits, False, grouped, arch=arch) for rows in range(1, 17)]


def test_sm_90_makes_the_choices_made_before_the_table():
    for (n, k, bits, grouped), (half2, one, two, more) in GEMV_SM90.items():
        assert gemv_choices("sm_90", n, k, bits, grouped) == [half2, one, two] + [more] * 14, (n, k, bits, grouped)
    for (n, k), bits, rows in itertools.product(SHAPES, (0, 8, 4), range(1, 18)):
        expected = (n, k, bits) in CUBLAS_SM90 and 2 <= rows <= 16
        assert gemv.cublas_is_faster(rows, n, k, bits, arch="sm_90") == expected, (n, k, bits, rows)
    for (n, k, bits), (plain, gated) in MMA_SM90.items():
        assert weight_only_mma.launch_config(n, k, bits, False, "sm_90") == plain, (n, k, bits)
        if gated is not None:
            assert weight_only_mma.launch_config(n, k, bits, True, "sm_90") == gated, (n, k, bits)


@pytest.mark.parametrize("arch, n, k", [("sm_90", 5120, 5120), ("sm_90", 8192, 28672), ("sm_90", 4608, 2048),
                                        ("sm_80", 4608, 4096), ("sm_100", 4096, 13696),
                                        (launch_configs.NO_GPU, 27392, 4096)])
def test_unknown_shapes_and_architectures_take_the_default(arch, n, k):
    for (bits, grouped), (half2, one, more) in GEMV_DEFAULT.items():
        assert gemv_choices(arch, n, k, bits, grouped) == [half2, one] + [more] * 15, (bits, grouped)
        assert not any(gemv.cublas_is_faster(rows, n, k, bits, arch=arch) for rows in range(1, 18))
    for (bits, swiglu), expected in MMA_DEFAULT.items():
        assert weight_only_mma.launch_config(n, k, bits, swiglu, arch) == expected, (bits, swiglu)


def test_off_the_gpu_the_default_applies():
    assert launch_configs.architecture(torch.device("cpu")) == launch_configs.NO_GPU
    if torch.cuda.is_available():
        assert launch_configs.architecture(torch.device("cuda")).startswith("sm_")
        return
    assert launch_configs.architecture(torch.device("cuda", 0)) == launch_configs.NO_GPU
    assert launch_configs.architecture() == launch_configs.NO_GPU
    assert gemv.default_config(2, 4096, 4096, 4) == DOT_SPLIT_2  # sm_90 would take FMA_8
    assert not gemv.cublas_is_faster(8, 4608, 4096, 0)
    assert weight_only_mma.launch_config(4096, 13696, 4) == (16, 1, 1)  # sm_90: (16, 2, 1)


def test_int4_rows_of_no_whole_int32_words_take_tl_dot():
    """The FMA and half2 paths read int32 words: where K is no multiple of 8 int4 values
    the choice at MAX_ROWS rows (tl.dot) serves, as before the table."""
    assert gemv.default_config(1, 24, 36, 4) == DOT_SPLIT_2
    assert gemv.default_config(1, 24, 36, 4, half2_ok=True, grouped=True) == DOT_SPLIT_4
    assert gemv.default_config(1, 24, 36, 8) == FMA_8  # 36 int8 values are 9 words


def test_every_choice_in_the_table_can_run():
    """Each gemv choice is a config; half2 ones only where the half2 path may run (one row);
    above MAX_FMA_ROWS only tl.dot (the fallback for K of no whole words takes MAX_ROWS);
    and the defaults cover every variant at 1 to MAX_ROWS rows."""
    for entries in launch_configs.table()["gemv"].values():
        for entry in entries:
            config = gemv.config_from_choice(entry["choice"])
            assert not config.half2 or (entry["half2"] and entry["rows"] == 1 and entry["bits"]), entry
            assert config.use_dot or entry["rows"] <= gemv.MAX_FMA_ROWS, entry
    for bits, grouped, rows in itertools.product((0, 8, 4), (False, True), range(1, gemv.MAX_ROWS + 1)):
        for half2 in (False, True) if rows == 1 and bits else (False,):
            launch_configs.choice("gemv", "sm_00", rows, bits=bits, grouped=grouped and bits != 0, half2=half2)


def timing(rows: int, config: GemvConfig, us: float, bits: int = 4, error: float = 1e-3) -> dict:
    return {"n": 5120, "k": 5120, "bits": bits, "grouped": False, "rows": rows, "config": config, "us": us,
            "error": error}


def test_tuning_script_keeps_the_fastest_gemv_choices():
    """Per key the fastest config of results close to the reference; at one row on quantized
    weights one entry with the half2 path and one without; fp16 marked "cublas" where cuBLAS
    was faster still."""
    timings = [timing(1, FMA_8, 5.0), timing(1, HALF2_8, 3.0), timing(1, DOT_SPLIT_2, 6.0),
               timing(1, HALF2_4, 2.0, error=0.5), timing(8, DOT_32X512, 1.0, error=0.5),
               timing(8, DOT_SPLIT_4, 9.0), timing(8, DOT_SPLIT_2, 7.0),
               timing(1, FMA_4, 8.0, 0), timing(8, DOT_32X512, 7.0, 0)]
    entries = tune_gemv.gemv_entries(timings, {(5120, 5120, 1): 9.0, (5120, 5120, 8): 6.5})
    key = {"n": 5120, "k": 5120, "grouped": False}
    assert entries == [
        {**key, "bits": 4, "half2": False, "rows": 1, "choice": gemv.choice_of(FMA_8)},
        {**key, "bits": 4, "half2": True, "rows": 1, "choice": gemv.choice_of(HALF2_8)},
        {**key, "bits": 4, "half2": False, "rows": 8, "choice": gemv.choice_of(DOT_SPLIT_2)},
        {**key, "bits": 0, "half2": False, "rows": 1, "choice": gemv.choice_of(FMA_4)},
        {**key, "bits": 0, "half2": False, "rows": 8, "choice": {**gemv.choice_of(DOT_32X512), "cublas": True}}]
    assert all(gemv.config_from_choice(entry["choice"]) == config for entry, config in
               zip(entries, [FMA_8, HALF2_8, DOT_SPLIT_2, FMA_4, DOT_32X512]))


def test_tuning_script_keeps_the_mma_config_fastest_over_all_rows():
    timings = [{"n": 5120, "k": 5120, "bits": 4, "swiglu": False, "rows": rows, "config": config, "us": us}
               for rows, config, us in [(1, (4, 1, 0), 5.0), (8, (4, 1, 0), 9.0), (1, (8, 2, 1), 6.0),
                                        (8, (8, 2, 1), 7.0), (1, (16, 1, 1), 1.0)]]  # (16, 1, 1): one row only
    assert tune_gemv.mma_entries(timings) == [{"n": 5120, "k": 5120, "bits": 4, "swiglu": False,
                                               "choice": {"warps": 8, "unroll": 2, "pipe": 1}}]


def test_int8_tuning_keeps_the_fused_gemm_only_where_it_beat_int_mm_over_all_rows():
    small = {"fused": True, "block_m": 64, "block_n": 128, "block_k": 128, "group_m": 8, "num_warps": 4,
             "num_stages": 4}
    large = {**small, "block_m": 128, "num_warps": 8}
    timings = [{"rows": 512, "n": 4096, "k": 4096, "int_mm": 30.0, "fused": [(small, 20.0), (large, 25.0)]},
               {"rows": 2048, "n": 4096, "k": 4096, "int_mm": 100.0, "fused": [(small, 90.0), (large, 70.0)]},
               {"rows": 512, "n": 4608, "k": 4096, "int_mm": 30.0, "fused": [(small, 35.0), (large, 10.0)]},
               {"rows": 2048, "n": 4608, "k": 4096, "int_mm": 100.0, "fused": [(small, 96.0)]}]  # large failed
    assert tune_int8_gemm.entries(timings) == [{"n": 4096, "k": 4096, "choice": large},
                                               {"n": 4608, "k": 4096, "choice": {"fused": False}}]


def test_unmeasured_shapes_keep_int_mm():
    """The int8 prompt GEMM's default (a shape or GPU tune_int8_gemm.py has not measured,
    and off the GPU) is the path measured: torch._int_mm and the scaling kernel."""
    for arch in ("sm_90", "sm_80", launch_configs.NO_GPU):
        assert launch_configs.choice("int8_gemm", arch, n=123, k=456) == {"fused": False}


@pytest.fixture
def fresh_lookups():
    """Cleared loader caches, before and after (the test points the loader at another file)."""
    def clear() -> None:
        launch_configs.table.cache_clear()
        launch_configs._index.cache_clear()
        gemv._tuned.cache_clear()

    clear()
    yield
    clear()


def test_tuning_script_merges_into_the_table_the_kernels_read(tmp_path, monkeypatch, fresh_lookups):
    """write_table replaces the entries of the same key and rows, keeps the others and the
    default, adds the provenance line; the file reads back equal, and the kernels take the
    new choices on that architecture and the default elsewhere."""
    shipped = json.loads(launch_configs.TABLE.read_text())
    path = tmp_path / "launch_configs.json"
    path.write_text(tune_gemv.format_table(shipped))
    assert json.loads(path.read_text()) == shipped
    old = {"n": 5120, "k": 5120, "bits": 4, "grouped": False, "half2": False}
    other = {**old, "n": 6144}
    for rows in (1, 8):
        tune_gemv.write_table(path, "gemv", "sm_89", [{**old, "rows": rows, "choice": gemv.choice_of(FMA_4)},
                                                      {**other, "rows": rows, "choice": gemv.choice_of(FMA_4)}],
                              f"run {rows}")
    tune_gemv.write_table(path, "gemv", "sm_89", [{**old, "rows": 8, "choice": gemv.choice_of(DOT_SPLIT_4)}],
                          "run 3")
    table = json.loads(path.read_text())
    assert table["gemv"]["sm_89"] == [{**old, "rows": 1, "choice": gemv.choice_of(FMA_4)},
                                      {**old, "rows": 8, "choice": gemv.choice_of(DOT_SPLIT_4)},
                                      {**other, "rows": 1, "choice": gemv.choice_of(FMA_4)},
                                      {**other, "rows": 8, "choice": gemv.choice_of(FMA_4)}]
    assert table["provenance"]["gemv"]["sm_89"] == ["run 1", "run 8", "run 3"]
    del table["gemv"]["sm_89"], table["provenance"]["gemv"]["sm_89"]
    assert table == shipped
    monkeypatch.setattr(launch_configs, "TABLE", path)
    # Rows 2-8 fall in the 8-row bucket; 9 and more rows are past every entry: the default.
    assert [gemv.default_config(rows, 5120, 5120, 4, arch="sm_89") for rows in (1, 2, 8, 9)] == \
        [FMA_4, DOT_SPLIT_4, DOT_SPLIT_4, DOT_SPLIT_2]
    assert gemv.default_config(2, 5120, 5120, 4, arch="sm_90") == DOT_SPLIT_2
