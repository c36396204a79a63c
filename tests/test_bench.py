"""`bertfast bench`: the whole suite runs in --quick mode and writes each family's JSON, report and plot;
--compare flags what lies beyond the run-to-run spread. Timings are never asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bertfast import cli
from bertfast.bench import FAMILIES, report
from bertfast.bench.families import inference
from bertfast.bench.families.inference import ragged_lengths
from bertfast.bench.suite import Measurement
from bertfast.bench.timing import Stats


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """One `bertfast bench --quick` of every family, on one thread (tiny matrices), read by several tests."""
    tmp = tmp_path_factory.mktemp("bench")
    out, saved = tmp / "run", tmp / "saved"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["bench", "--quick", "--device", "cpu", "--output-dir", str(out), "--save", "first",
                         "--saved-dir", str(saved)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, saved, json.loads((out / "run.json").read_text())


def test_quick_suite_writes_every_familys_json_report_and_plot(quick_run):
    out, saved, record = quick_run
    assert record["environment"]["threads"] == 1
    assert record["environment"]["versions"]["torch"]
    assert "commit" in record["environment"] and record["settings"]["quick"]
    assert set(record["families"]) == set(FAMILIES)
    for name in FAMILIES:
        measurements = record["families"][name]["measurements"]
        ok = [m for m in measurements if m["status"] == "ok"]
        subjects = [m for m in ok if m["baseline"] == m["subject"]]
        assert subjects and len({m["baseline"] for m in ok}) >= 2, (name, measurements)
        assert all(m["stats"]["samples"] >= 1 and m["stats"]["median_ms"] > 0 for m in ok)
        text = (out / f"{name}.md").read_text()
        assert text.startswith("# ") and "speed-up" in text and "Quick mode" in text
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    if record["environment"]["triton_interpret"]:  # the Triton kernels ran in the interpreter
        baselines = {m["baseline"] for m in record["families"]["layernorm-family"]["measurements"]
                     if m["status"] == "ok"}
        assert "bertfast[triton]" in baselines
    inference = (out / "inference.md").read_text()
    assert "bertfast vs fastest" in inference and "GEMM GFLOP/s" in inference
    assert "bertfast % of limit" in inference and "copy bandwidth" in inference
    _check_inference_limits(record["families"]["inference"]["measurements"])
    assert json.loads((saved / "first.json").read_text())["families"].keys() == record["families"].keys()


def _check_inference_limits(measurements: list[dict]) -> None:
    """Every timed peer has its limit, recomputed here from the copy and GEMM measured in its group."""
    by = {(m["kernel"], m["shape"], m["baseline"], m["mode"]): m for m in measurements if m["status"] == "ok"}
    peers = [m for m in by.values() if m["baseline"] in inference.PEERS]
    assert {m["mode"] for m in peers} >= {"fp32"}
    for m in peers:
        copy = by[(m["kernel"], m["shape"], inference.COPY, "fp32")]
        gemm = by[(m["kernel"], m["shape"], inference.GEMM if m["mode"] == "fp32" else inference.LOW_GEMM, m["mode"])]
        bandwidth = copy["info"]["copy_bytes"] / (copy["ms"] * 1e-3)
        memory_ms = 1e3 * m["info"]["weight_bytes"][m["mode"]] / bandwidth
        compute_ms = 1e3 * m["work"] / (gemm["work"] / (gemm["ms"] * 1e-3))
        limit = m["info"]["limit"]
        assert limit["memory_ms"] == pytest.approx(memory_ms) and limit["compute_ms"] == pytest.approx(compute_ms)
        assert limit["limit_ms"] == pytest.approx(max(memory_ms, compute_ms))
        assert limit["fraction"] == pytest.approx(limit["limit_ms"] / m["ms"])
        assert limit["bandwidth_GB_s"] > 0 and limit["bound"] in ("memory", "compute")


def _expected_status(engine: str, family: str, precision: str) -> str:
    """What each engine peer does on a tiny model of each family: "ok", or the start of its reason."""
    if engine == "onnxruntime" and precision == "bf16":
        return "n/a: ONNX Runtime's CPU kernels have no bf16"
    if engine == "ctranslate2" and precision == "bf16":
        import ctranslate2

        if "bfloat16" not in ctranslate2.get_supported_compute_types("cpu"):
            return "n/a: CTranslate2 has no bfloat16 compute on this CPU"
    if engine == "ctranslate2" and family == "mpnet":
        return "n/a: CTranslate2's converter has no loader for MPNetConfig"
    return "ok"


@pytest.mark.parametrize("engine", inference.ENGINES)
def test_quick_inference_engines_agree_with_transformers(quick_run, engine):
    """Each engine ran every tiny family it can convert, at every precision measured here, and its sentence
    embeddings agree with transformers' fp32 ones: in fp32 to rounding (the tiny random models' attention is
    near uniform, so even attending to the padding costs only the fourth digit), in bf16 and int8 to 0.999."""
    pytest.importorskip(engine)
    families = {spec.name: spec.family for spec in inference.QUICK_MODELS}
    measurements = [m for m in quick_run[2]["families"]["inference"]["measurements"] if m["baseline"] == engine]
    assert {m["kernel"] for m in measurements} == set(families)
    assert {m["mode"] for m in measurements} >= {"fp32", "int8"}
    for m in measurements:
        expected = _expected_status(engine, families[m["kernel"]], m["mode"])
        assert m["status"].startswith(expected), (m["kernel"], m["shape"], m["mode"], m["status"])
        if m["status"] == "ok":
            least = 0.99999 if m["mode"] == "fp32" else 0.999
            assert m["info"]["cos_min"] > least, (m["kernel"], m["shape"], m["mode"], m["info"])


def test_a_missing_engine_is_named_not_measured(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in inference.ENGINES else find_spec(name, *args))
    peers = inference.Peers(inference.QUICK_MODELS[0], torch.device("cpu"))
    for engine in inference.ENGINES:
        assert peers.engine(engine, "fp32") == f"{engine} is not installed"


def test_weight_bytes_count_the_layers_and_pooler_at_each_precision():
    import bertfast

    config = bertfast.BertConfig.from_preset("tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    model = bertfast.BertModel(config)
    counted = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embeddings."))
    assert inference.weight_bytes(config, "fp32") == 4 * counted
    assert inference.weight_bytes(config, "bf16") == 2 * counted
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embeddings" not in name)
    assert inference.weight_bytes(config, "int8") == matrices + 4 * (counted - matrices)


@pytest.mark.parametrize("spec", inference.QUICK_MODELS[1:], ids=lambda spec: spec.family)
def test_weight_bytes_count_mpnet_and_distilbert_layers(spec):
    """MPNet's layers and pooler, DistilBERT's layers (it has no pooler); the embeddings, MPNet's
    relative-position bias among them, are tables a forward reads a few rows of."""
    transformers = pytest.importorskip("transformers")

    config = transformers.AutoConfig.for_model(spec.family, **dict(spec.config))
    model = getattr(transformers, inference.FAMILIES[spec.family].model_class)(config)
    counted = sum(p.numel() for name, p in model.named_parameters()
                  if not name.startswith("embeddings.") and "relative_attention_bias" not in name)
    assert inference.weight_bytes(config, "fp32") == 4 * counted


def _measurement(baseline: str, samples: list[float], kernel: str = "bias_gelu") -> Measurement:
    return Measurement("layernorm-family", kernel, "1024x768 fp32", 1024, "tokens", baseline, "fwd", "fp32", "ok",
                       Stats.of([samples]), work=1e6, unit="GB/s", subject="bertfast")


def _saved_run(path: Path, measurements: list[Measurement]) -> Path:
    environment = {"date": "2026-01-01T00:00:00Z", "commit": "abc", "device": "cpu"}
    family = {"family": "layernorm-family", "title": "t", "notes": "", "load_average_start": None,
              "load_average_end": None, "measurements": measurements}
    record = report.run_record(environment, {}, {"quick": False}, [family])
    path.write_text(json.dumps(record))
    return path


def test_compare_flags_only_slowdowns_beyond_the_spread(tmp_path):
    before = _saved_run(tmp_path / "before.json", [
        _measurement("bertfast", [1.0, 1.01, 0.99, 1.0]),
        _measurement("reference", [2.0, 2.2, 1.8, 2.0]),
        _measurement("bertfast", [1.0, 1.0, 1.0, 1.0], kernel="bias_gelu_layernorm"),
        _measurement("gone", [1.0, 1.0]),
    ])
    after = _saved_run(tmp_path / "after.json", [
        _measurement("bertfast", [1.3, 1.31, 1.29, 1.3]),  # 30% slower, quartiles apart: a regression
        _measurement("reference", [2.1, 2.3, 1.9, 2.1]),  # 5% slower but within the spread
        _measurement("bertfast", [0.5, 0.5, 0.5, 0.5], kernel="bias_gelu_layernorm"),  # twice as fast
        _measurement("new", [1.0, 1.0]),
    ])
    lines, regressions = report.compare(report.load_run(after), report.load_run(before), threshold=0.05)
    assert regressions == 1
    rows = {(line.split("|")[2].strip(), line.split("|")[5].strip()): line.split("|")[-2].strip() for line in lines[2:]}
    assert rows == {("bias_gelu", "bertfast"): "**REGRESSION**", ("bias_gelu", "reference"): "same",
                    ("bias_gelu_layernorm", "bertfast"): "faster"}


def test_compare_threshold_hides_small_but_separated_slowdowns(tmp_path):
    before = _saved_run(tmp_path / "before.json", [_measurement("bertfast", [1.0, 1.0, 1.0])])
    after = _saved_run(tmp_path / "after.json", [_measurement("bertfast", [1.03, 1.03, 1.03])])
    assert report.compare(report.load_run(after), report.load_run(before), threshold=0.05)[1] == 0
    assert report.compare(report.load_run(after), report.load_run(before), threshold=0.01)[1] == 1


def test_bad_arguments_are_named(tmp_path, capsys):
    assert cli.main(["bench", "no-such-family", "--quick"]) == 2
    assert "unknown benchmark family 'no-such-family'" in capsys.readouterr().err
    assert cli.main(["bench", "model", "--quick", "--compare", "nothing", "--saved-dir", str(tmp_path)]) == 2
    assert "no saved run 'nothing'" in capsys.readouterr().err
    assert cli.main(["bench", "model", "--quick", "--rounds", "0"]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{}")
    assert cli.main(["bench", "model", "--quick", "--compare", str(tmp_path / "broken.json")]) == 2
    assert "is not a saved run" in capsys.readouterr().err


@pytest.mark.parametrize(("batch", "fill"), [(8, 0.42), (32, 0.62), (4, 0.5)])
def test_ragged_batches_have_the_requested_fill(batch, fill):
    lengths = ragged_lengths(batch, 128, fill)
    assert len(lengths) == batch and max(lengths) == 128 and min(lengths) >= 1
    assert abs(sum(lengths) - fill * batch * 128) <= batch
