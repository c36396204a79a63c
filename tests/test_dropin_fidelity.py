"""The drop-in keeps transformers' meaning: hooks, hidden states by index, checkpointing, replicas."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import bertfast
from bertfast import ops
from bertfast.dropin import fallback_reason, is_accelerated

transformers = pytest.importorskip("transformers")

LAYERS = 3


def bert_config(**overrides):
    values = dict(vocab_size=60, hidden_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
                  intermediate_size=72, max_position_embeddings=40, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, num_labels=3)
    values.update(overrides)
    return transformers.BertConfig(**values)


def ragged_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 60, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(9)[None] < torch.tensor([9, 1, 5, 7])[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def attention_calls(monkeypatch) -> list:
    """Counts bertfast's fused attention calls: one per layer forward, one more per recomputation."""
    calls: list = []
    attention = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: calls.append(1) or attention(*a, **k))
    return calls


def first(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("path", ["encoder.layer.1", "encoder.layer.1.attention.output.dense", "embeddings"])
def test_hooks_fire_and_see_transformers_tensors(path, packed_calls, one_thread):
    ref = transformers.BertModel(bert_config()).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch()
    call = {"input_ids": ids, "attention_mask": mask}
    assert fallback_reason(fast, call) is None
    seen: dict[str, list] = {"ref": [], "fast": []}
    handles = []
    for tag, model in (("ref", ref), ("fast", fast)):
        module = model.get_submodule(path)
        handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs, tag=tag: seen[tag].append(first(args or tuple(kwargs.values())).clone()),
            with_kwargs=True))
        handles.append(module.register_forward_hook(lambda m, args, out, tag=tag: seen[tag].append(first(out))))
    assert fallback_reason(fast, call) == f"forward pre-hook on {path}"
    expected, got = ref(ids, attention_mask=mask), fast(ids, attention_mask=mask)
    assert not packed_calls
    assert len(seen["fast"]) == 2 and seen["fast"][1].shape[:2] == (4, 9)  # transformers' layout, not packed
    for a, b in zip(seen["ref"], seen["fast"], strict=True):
        torch.testing.assert_close(b, a)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state)  # padding too: transformers ran
    for handle in handles:
        handle.remove()
    assert fallback_reason(fast, call) is None
    fast(ids, attention_mask=mask)
    assert packed_calls


def test_backward_and_global_hooks_fall_back(packed_calls, one_thread):
    ref = transformers.BertModel(bert_config()).train()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch()
    grads: dict[str, list] = {"ref": [], "fast": []}
    for tag, model in (("ref", ref), ("fast", fast)):
        model.encoder.layer[0].output.register_full_backward_hook(
            lambda m, grad_in, grad_out, tag=tag: grads[tag].append(grad_out[0]))
    assert fallback_reason(fast, {"input_ids": ids}) == "backward hook on encoder.layer.0.output"
    for model in (ref, fast):
        model(ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert len(grads["fast"]) == 1 and grads["fast"][0].shape == (4, 9, 48)
    torch.testing.assert_close(grads["fast"][0], grads["ref"][0])

    plain = bertfast.accelerate(transformers.BertModel(bert_config()).eval())
    names: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: names.append(type(m).__name__))
    try:
        assert "global module forward hook" in fallback_reason(plain, {"input_ids": ids})
        plain(ids, attention_mask=mask)
    finally:
        handle.remove()
    assert names.count("BertLayer") == LAYERS and "BertSelfAttention" in names
    assert not packed_calls


def test_transformers_own_recorder_hooks_keep_the_packed_path(packed_calls, one_thread):
    """transformers installs its output recorder hooks on first use and leaves them; they record only
    while a model's forward collects outputs, so they send a call back only while one does."""
    config = bert_config()
    config._attn_implementation = "eager"
    ref = transformers.BertModel(config).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch()
    fast(ids, attention_mask=mask, output_attentions=True)  # transformers' forward: it hooks the layers
    assert not packed_calls and fast.encoder.layer[0]._forward_hooks
    assert fallback_reason(fast, {"input_ids": ids}) is None
    got = fast(ids, attention_mask=mask, output_hidden_states=True)
    expected = ref(ids, attention_mask=mask, output_hidden_states=True)
    assert packed_calls
    keep = mask.bool()
    for a, b in zip(expected.hidden_states, got.hidden_states, strict=True):
        torch.testing.assert_close(b[keep], a[keep], atol=1e-5, rtol=1e-5)
    from transformers.utils.output_capturing import _active_collector

    token = _active_collector.set({"hidden_states": []})  # as inside an enclosing model's recording forward
    try:
        assert "output recorder" in fallback_reason(fast, {"input_ids": ids})
    finally:
        _active_collector.reset(token)


@pytest.mark.parametrize("selection", [[0, 2, -1], -2, 1, [7, -9], [], 0])
@pytest.mark.parametrize("return_dict", [True, False])
def test_hidden_states_by_index_are_transformers(selection, return_dict, packed_calls, one_thread):
    ref = transformers.BertModel(bert_config()).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch()
    every = fast(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    expected = ref(ids, attention_mask=mask, output_hidden_states=selection, return_dict=return_dict)
    got = fast(ids, attention_mask=mask, output_hidden_states=selection, return_dict=return_dict)
    assert len(packed_calls) == 2
    assert type(got) is type(expected) and len(got) == len(expected)
    if return_dict:
        expected, got = expected.hidden_states, got.hidden_states
    else:
        expected, got = (expected[2], got[2]) if len(expected) > 2 else (None, None)
    if expected is None:
        assert got is None
        return
    assert len(got) == len(expected) == LAYERS + 1
    keep = mask.bool()
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert (a is None) == (b is None), i
        if b is not None:
            torch.testing.assert_close(b[keep], a[keep], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b, every[i])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_recomputes_through_the_layer_calls(use_reentrant, packed_calls, attention_calls, one_thread):
    ref = transformers.BertForSequenceClassification(bert_config()).train()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    plain = copy.deepcopy(fast)
    for model in (ref, fast):
        model.bert.embeddings.requires_grad_(False)  # reentrant checkpointing then needs the input-grads hook
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    plain.bert.embeddings.requires_grad_(False)
    checkpointed: list = []
    for layer in fast.bert.encoder.layer:
        run = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda fn, *a, run=run, **k: checkpointed.append(1) or run(fn, *a, **k)
    ids, mask = ragged_batch()
    labels = torch.tensor([0, 1, 2, 0])
    for model in (ref, fast, plain):
        model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert len(packed_calls) == 2  # fast and plain, both packed
    assert len(checkpointed) == LAYERS
    assert len(attention_calls) == 3 * LAYERS  # checkpointed: forward + recompute; plain: forward
    for (name, p), q, r in zip(fast.named_parameters(), ref.parameters(), plain.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None and r.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(p.grad, r.grad, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_bertfast_models_checkpoint_through_their_layer_calls(attention_calls, one_thread):
    config = bertfast.BertConfig.from_preset("tiny", vocab_size=60, hidden_dropout_prob=0.1, num_labels=3)
    torch.manual_seed(0)
    plain = bertfast.BertForSequenceClassification(config).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    layer_calls: list = []
    for layer in checkpointed.bert.encoder.layer:
        layer.register_forward_pre_hook(lambda m, args: layer_calls.append(1))
    ids, mask = ragged_batch()
    labels = torch.tensor([0, 1, 2, 0])
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks; the recompute replays them
        model(ids, attention_mask=mask, labels=labels).loss.backward()
    layers = config.num_hidden_layers
    assert len(layer_calls) == 2 * layers and len(attention_calls) == 3 * layers
    for (name, p), q in zip(checkpointed.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def cpu_replica(model: torch.nn.Module, monkeypatch) -> torch.nn.Module:
    """What nn.DataParallel runs on each device: torch.nn.parallel.replicate's replica, with the
    broadcast to GPUs replaced by differentiable copies on the CPU (its only CUDA-bound step)."""
    replicate_module = importlib.import_module("torch.nn.parallel.replicate")  # the module, not the function

    def broadcast(tensors, devices, detach=False):
        return [[t.detach().clone() if detach else t * 1 for t in tensors] for _ in devices]

    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape", broadcast)
    return replicate_module.replicate(model, [0])[0]


def test_a_data_parallel_replica_runs_packed_on_its_own_parameters(packed_calls, monkeypatch, one_thread):
    ref = transformers.BertForSequenceClassification(bert_config()).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    replica = cpu_replica(fast, monkeypatch)
    assert is_accelerated(replica.bert)
    edited = copy.deepcopy(ref)
    with torch.no_grad():
        for model in (replica, edited):
            model.bert.encoder.layer[1].output.dense.weight.mul_(2.0)
            model.bert.embeddings.word_embeddings.weight.add_(0.5)
    ids, mask = ragged_batch()
    got = replica(ids, attention_mask=mask).logits
    assert packed_calls
    torch.testing.assert_close(got, edited(ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    hidden = replica.bert(ids, attention_mask=mask).last_hidden_state
    assert (hidden - fast.bert(ids, attention_mask=mask).last_hidden_state).abs().max() > 1e-2  # not the original's
    got.sum().backward()  # gradients reach the original parameters through the copies, as in DataParallel
    assert fast.bert.encoder.layer[0].attention.self.query.weight.grad is not None



def test_an_accelerated_model_compiles_in_one_graph(packed_calls, one_thread):
    """The per-call checks (hooks, options) trace without a graph break."""
    import torch._dynamo

    model = bertfast.accelerate(transformers.BertForSequenceClassification(bert_config()).eval())
    ids, mask = ragged_batch()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda: model(ids, attention_mask=mask).logits.sum())()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert packed_calls
