"""The GPU tuning sweep runs end to end (in the interpreter, on tiny shapes), so a GPU's time goes to measuring."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tune_kernels  # noqa: E402

from bertfast.kernels import attention, bias_dropout_add_layernorm, bias_gelu  # noqa: E402


@pytest.fixture
def sweep(one_thread):
    if not tune_kernels.torch.cuda.is_available() and not attention.os.environ.get("TRITON_INTERPRET"):
        pytest.skip("needs a GPU or the Triton interpreter")
    return tune_kernels.Sweep(
        tune_kernels.torch.device("cpu"), reps=1, tokens=24, seqlens=(24,), hiddens=(16,),
        fwd_candidates=(attention.FwdConfig(16, 16, 4, 1), attention.FwdConfig(32, 16, 4, 1)),
        bwd_candidates=(attention.BwdConfig(16, 32, 16, 4, 1), attention.BwdConfig(16, 16, 16, 4, 1)),
        row_warps=(2,), programs_per_sm=(2,), gelu_tiles=((2, 4),),
    )


def test_attention_sweep_reports_the_shipped_and_the_fastest_configuration(sweep):
    lines = tune_kernels.tune_attention(sweep)
    rows = [line for line in lines if line.startswith("| 24 |")]
    for pass_ in ("fwd", "bwd"):
        labels = [row.split("|")[-2].strip() for row in rows if f"| {pass_} |" in row]
        assert "fastest" in labels or "shipped" in labels, lines
        assert 1 <= len(labels) <= 2


def test_layernorm_sweep_covers_every_knob_and_restores_the_launchers(sweep):
    originals = (bias_dropout_add_layernorm.row_config, bias_dropout_add_layernorm.partial_programs,
                 bias_gelu._tile_config, bias_gelu._NUM_WARPS)
    lines = tune_kernels.tune_layernorm(sweep)
    measured = {(row.split("|")[1].strip(), row.split("|")[3].strip()) for row in lines if "| 16 |" in row}
    assert measured == {
        ("bias_dropout_add_layernorm", "warps"), ("bias_gelu_layernorm", "warps"), ("embeddings", "warps"),
        ("bias_dropout_add_layernorm", "programs_per_sm"), ("bias_gelu_layernorm", "programs_per_sm"),
        ("embeddings", "programs_per_sm"), ("bias_gelu", "programs_per_sm"), ("bias_gelu", "gelu_tile"),
    }
    assert all("fastest" in row or "shipped" in row for row in lines if "| 16 |" in row)
    assert (bias_dropout_add_layernorm.row_config, bias_dropout_add_layernorm.partial_programs,
            bias_gelu._tile_config, bias_gelu._NUM_WARPS) == originals


def test_knobs_reach_the_launchers(sweep):
    with tune_kernels._row_knobs(sms=3, warps=2, programs_per_sm=5, gelu_tile=(8, 2)):
        assert bias_dropout_add_layernorm.row_config(768) == (1024, 2)
        assert bias_dropout_add_layernorm.partial_programs(10_000, None) == 15
        assert bias_gelu._tile_config(3072) == (8, 1024) and bias_gelu._NUM_WARPS == 2
    assert bias_dropout_add_layernorm.row_config(768) == (1024, 4)
