"""Prepacked inference (bertfast.prepacked, csrc/linear.cpp): bertfast::linear and bertfast::encoder_layer against
plain PyTorch, the int8 product exact on every instruction set, and the packed-weight cache's invalidation."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_matches_reference

import bertfast
from bertfast import ops, prepacked
from bertfast.prepacked import Int8Linear, int8_linear_reference

pytestmark = pytest.mark.skipif(not prepacked.native_available(), reason="bertfast's native library is not built")

ACTIVATIONS = {"none": lambda y: y, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}


@pytest.mark.parametrize("rows", [0, 1, 7, 130])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_plain_pytorch(rows, activation, dtype, bias):
    if dtype == torch.bfloat16 and not prepacked.bf16_packable():
        pytest.skip("oneDNN packs no bf16 weights on this CPU (the module path runs bf16 there)")
    layer = torch.nn.Linear(33, 65, bias=bias).to(dtype)
    x = torch.randn(rows, 33, dtype=dtype)
    act = ACTIVATIONS[activation]
    with torch.inference_mode():
        got = prepacked.linear(layer, x, activation)
        fp32 = act(F.linear(x.float(), layer.weight.float(), None if not bias else layer.bias.float()))
        same_dtype = act(F.linear(x, layer.weight, layer.bias))
    assert got.shape == (rows, 65)
    assert_matches_reference(("y",), (got,), (fp32,), (same_dtype,))


@pytest.mark.parametrize("levels", [127, 64])
@pytest.mark.parametrize("rows", [0, 1, 5, 67])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_int8_linear_is_the_exact_integer_product(levels, rows, activation):
    if levels > prepacked.int8_weight_levels():
        pytest.skip(f"this CPU's int8 product is exact up to {prepacked.int8_weight_levels()} weight levels")
    layer = Int8Linear(torch.nn.Linear(96, 40), levels=levels)
    x = torch.randn(rows, 96) * torch.rand(rows, 1) * 10  # rows of different scales
    with torch.inference_mode():
        got = prepacked.linear(layer, x, activation)
    expected = ACTIVATIONS[activation](int8_linear_reference(x, layer.weight_int8, layer.weight_scale, layer.bias))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_int8_linear_is_close_to_the_float_layer_and_keeps_dtype_and_shape():
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 7, 96)
    y8 = Int8Linear(linear)(x)
    assert y8.shape == (3, 7, 40)
    y = linear(x)
    assert (y8 - y).abs().max() <= 0.02 * y.abs().max()
    assert Int8Linear(linear)(x.bfloat16()).dtype == torch.bfloat16


_AVX2_PROBE = """
import torch
from bertfast import prepacked
from bertfast.prepacked import Int8Linear, int8_linear_reference
levels = prepacked.int8_weight_levels()
torch.manual_seed(0)
# Full-range weights against full-range activations: the worst case for a 16-bit pair sum.
x = torch.full((3, 128), 5.0)
full = Int8Linear(torch.nn.Linear(128, 8), levels=127)
full.weight_int8.fill_(127)
wrong = (prepacked.linear(full, x) - int8_linear_reference(x, full.weight_int8, full.weight_scale, full.bias)).abs()
layer = Int8Linear(torch.nn.Linear(128, 8))
layer.weight_int8.copy_(torch.where(torch.rand(8, 128) < 0.5, levels, -levels).to(torch.int8))
x = torch.randn(3, 128).abs()
error = (prepacked.linear(layer, x) - int8_linear_reference(x, layer.weight_int8, layer.weight_scale, layer.bias))
print(levels, float(wrong.max()), float(error.abs().max()))
"""


@pytest.mark.parametrize("isa", ["AVX2", None])
def test_int8_levels_keep_the_product_exact_on_each_instruction_set(isa):
    """oneDNN limited to AVX2 (``ONEDNN_MAX_CPU_ISA``) saturates full-range int8 products; the probe sees it and
    the weights get 64 levels, whose products are exact at the worst case."""
    env = dict(os.environ)
    if isa is not None:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    else:
        env.pop("ONEDNN_MAX_CPU_ISA", None)
    out = subprocess.run([sys.executable, "-c", _AVX2_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    levels, saturated, error = out.stdout.split()
    if int(levels) == 64:
        assert float(saturated) > 1.0  # full range would be wrong here: what the probe guards against
    else:
        assert isa is None and float(saturated) < 1e-3
    assert float(error) < 1e-4


def prepacked_layers_of(model) -> list:
    return [layer for layer in model.encoder.layer if prepacked.CACHE_KEY in layer.__dict__]


def _bert(**overrides) -> bertfast.BertModel:
    config = bertfast.BertConfig.from_preset("tiny", vocab_size=120, hidden_size=48, num_attention_heads=4,
                                             intermediate_size=80, **overrides)
    return bertfast.BertModel(config).eval()


def _batch(lengths=(9, 1, 17)) -> dict[str, torch.Tensor]:
    width = max(lengths)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": torch.randint(1, 120, mask.shape) * mask, "attention_mask": mask}


def _hidden(model, batch, backend=None) -> torch.Tensor:
    with torch.inference_mode(), ops.use_backend(backend):
        return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_one_call_layer_matches_the_reference_and_runs(dtype):
    model, batch = _bert().to(dtype), _batch()
    got = _hidden(model, batch)
    packs = dtype == torch.float32 or prepacked.bf16_packable()  # else bf16 layers run op by op, still right
    assert prepacked_layers_of(model) == (list(model.encoder.layer) if packs else [])
    fp32 = _hidden(copy.deepcopy(model).float(), batch, "torch")
    assert_matches_reference(("hidden",), (got,), (fp32,), (_hidden(model, batch, "torch"),))


def test_int8_model_runs_its_layers_in_int8():
    model = _bert()
    batch = _batch()
    reference = _hidden(model, batch)
    quantized = bertfast.for_cpu_inference(copy.deepcopy(model), "int8")
    got = _hidden(quantized, batch)
    assert prepacked_layers_of(quantized) == list(quantized.encoder.layer)
    assert F.cosine_similarity(got, reference).min() > 0.98


def test_a_changed_or_replaced_weight_is_repacked_and_training_drops_the_packing():
    model, batch = _bert(), _batch()
    before = _hidden(model, batch)
    dense = model.encoder.layer[0].output.dense
    with torch.no_grad():
        dense.weight.mul_(2)  # in place: the version counter moves
    changed = _hidden(model, batch)
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(changed, _hidden(model, batch, "torch"), atol=1e-5, rtol=1e-5)
    model.encoder.layer[0].attention.self.query.weight = torch.nn.Parameter(torch.zeros(48, 48))
    torch.testing.assert_close(_hidden(model, batch), _hidden(model, batch, "torch"), atol=1e-5, rtol=1e-5)
    pooler = model.pooler.dense
    assert prepacked.CACHE_KEY in pooler.__dict__
    model.train()
    model(**batch)
    assert prepacked_layers_of(model) == [] and prepacked.CACHE_KEY not in pooler.__dict__


def test_a_module_the_layer_call_cannot_honour_runs_as_a_module():
    class Doubled(torch.nn.Module):  # a user's wrapper: the packed layer must not read through it
        def __init__(self, inner: torch.nn.Linear) -> None:
            super().__init__()
            self.inner = inner
            self.bias = inner.bias

        def forward(self, x):
            return 2 * self.inner(x)

    model, batch = _bert(), _batch()
    layer = model.encoder.layer[1]
    layer.intermediate.dense = Doubled(layer.intermediate.dense)
    got = _hidden(model, batch)
    assert prepacked_layers_of(model) == [model.encoder.layer[0]]
    torch.testing.assert_close(got, _hidden(model, batch, "torch"), atol=1e-5, rtol=1e-5)


def test_calls_that_record_autograd_take_the_module_path():
    model, batch = _bert(), _batch()
    with torch.enable_grad():
        out = model(**batch).last_hidden_state
    assert out.requires_grad and prepacked_layers_of(model) == []


def test_a_model_that_ran_prepacked_copies_and_saves():
    model, batch = _bert(), _batch()
    _hidden(model, batch)
    copied = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    torch.testing.assert_close(_hidden(copied, batch), _hidden(model, batch))


def test_a_plain_weight_is_refused_by_name():
    with pytest.raises(ValueError, match="takes a prepacked weight"):
        torch.ops.bertfast.linear(torch.randn(2, 4), torch.randn(3, 4), None, None, "none")
    packed, _, _ = prepacked.packed_weight(torch.nn.Linear(4, 3), "weight", (torch.nn.Linear(4, 3),), torch.float32)
    with pytest.raises(ValueError, match="activation must be 'none', 'gelu' or 'gelu_tanh'"):
        torch.ops.bertfast.linear(torch.randn(2, 4), packed, None, None, "relu")


@pytest.mark.parametrize("family,name", [("distilbert", "DistilBertModel"), ("mpnet", "MPNetModel"),
                                         ("electra", "ElectraModel")])
@pytest.mark.parametrize("holes", [False, True])
def test_family_layers_run_prepacked_in_inference_and_match_transformers(family, name, holes):
    """DistilBERT, MPNet (its relative-position bias passed to the layer call) and ELECTRA run their layers as one
    call each in inference; MPNet with a mask with holes runs op by op (the distances count columns)."""
    from test_dropin_families import PAD, build, ragged_batch

    transformers_model = build(family, name).eval()
    model = bertfast.accelerate(copy.deepcopy(transformers_model))
    ids, mask = ragged_batch(pad_id=PAD[family])
    if holes:
        mask[0, 3] = 0
    with torch.inference_mode():
        expected = transformers_model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
    layers = dict(model.named_modules())["transformer.layer" if family == "distilbert" else "encoder.layer"]
    ran = [layer for layer in layers if prepacked.CACHE_KEY in layer.__dict__]
    assert ran == ([] if holes and family == "mpnet" else list(layers))
