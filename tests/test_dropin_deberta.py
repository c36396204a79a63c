"""The drop-in on DeBERTa-v2/v3 (disentangled attention): every head against transformers, outputs and every
gradient, through accelerate() and patch_transformers(), on ragged batches with a one-token row and rows longer than
the position buckets; v3's and v2's configurations; masks with holes and left padding; refusals and fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from test_dropin import ragged_batch
from test_dropin_families import assert_multiple_choice_matches, assert_same, labels_for, run

import bertfast
from bertfast import prepacked
from bertfast.dropin import fallback_reason, is_accelerated

transformers = pytest.importorskip("transformers")

VOCAB = 60
# DeBERTa-v3's shape of configuration, tiny: shared key projections, both position terms, log buckets (4, so that
# the 9-token rows reach the log-bucketed and clamped distances), no absolute positions, no token types.
V3 = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=40,
          relative_attention=True, position_buckets=4, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
          share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0,
          pooler_dropout=0.0, num_labels=3)
# DeBERTa-v2's: separate position projections, content-to-position only, absolute positions and token types,
# no buckets (max_relative_positions rows each way).
V2 = dict(V3, share_att_key=False, pos_att_type=["c2p"], position_buckets=-1, max_relative_positions=6,
          norm_rel_ebd="none", position_biased_input=True, type_vocab_size=2)
HEADS = ["DebertaV2Model", "DebertaV2ForMaskedLM", "DebertaV2ForSequenceClassification",
         "DebertaV2ForTokenClassification", "DebertaV2ForQuestionAnswering"]


def build(name: str, **config):
    num_labels = 2 if name.endswith("QuestionAnswering") else 3
    torch.manual_seed(0)
    values = {**V3, **config, "num_labels": num_labels}
    return getattr(transformers, name)(transformers.DebertaV2Config(**values)).train()


def batch(name: str, mask_edit=None, token_types: bool = False) -> tuple[dict, torch.Tensor]:
    ids, mask = ragged_batch(pad_id=0)  # lengths 9, 1, 5, 7
    if mask_edit is not None:
        ids, mask = mask_edit(ids, mask)
    inputs = dict(input_ids=ids, attention_mask=mask, **labels_for(name, ids, mask))
    if token_types:
        inputs["token_type_ids"] = (torch.arange(9) > 4).long().expand(4, 9) * mask
    return inputs, mask


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("version", ["v3", "v2"])
def test_accelerate_matches_transformers_outputs_and_every_gradient(name, version, packed_calls, one_thread):
    ref = build(name, **({} if version == "v3" else V2))
    fast = bertfast.accelerate(copy.deepcopy(ref))
    assert is_accelerated(fast.base_model)
    inputs, mask = batch(name, token_types=version == "v2")
    assert_same(run(ref, inputs, mask), run(fast, inputs, mask))
    assert packed_calls == [1]


@pytest.mark.parametrize("name", HEADS)
def test_patch_transformers_matches_transformers(name, packed_calls, one_thread):
    ref = build(name)
    inputs, mask = batch(name)
    expected = run(copy.deepcopy(ref), inputs, mask)
    try:
        bertfast.patch_transformers()
        patched = copy.deepcopy(ref)
        assert is_accelerated(patched.base_model)
        got = run(patched, inputs, mask)
    finally:
        bertfast.unpatch_transformers()
    assert_same(expected, got)
    assert packed_calls == [1]


def test_multiple_choice_matches_transformers(packed_calls, one_thread):
    def assert_grad(actual, expected, name):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")

    assert_multiple_choice_matches(build("DebertaV2ForMultipleChoice"), 0, assert_grad)
    assert packed_calls == [1]


def _holes(ids, mask):
    mask = mask.clone()
    mask[0, 3] = 0
    mask[3, 1] = 0
    return ids * mask, mask


def _left_padding(ids, mask):
    return ids.flip(1), mask.flip(1)


@pytest.mark.parametrize("edit", [_holes, _left_padding])
@pytest.mark.parametrize("overrides", [{}, dict(embedding_size=32)])
def test_masks_with_holes_left_padding_and_an_embedding_projection_match(edit, overrides, packed_calls, one_thread):
    """Distances count padded columns, as transformers counts them; ``embed_proj`` maps the embedding size."""
    ref = build("DebertaV2ForMaskedLM", **overrides)
    fast = bertfast.accelerate(copy.deepcopy(ref))
    inputs, mask = batch("DebertaV2ForMaskedLM", edit)
    assert_same(run(ref, inputs, mask), run(fast, inputs, mask))
    assert packed_calls == [1]


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_inference_runs_each_layer_in_one_native_call_and_matches(version, packed_calls, one_thread):
    ref = build("DebertaV2Model", **({} if version == "v3" else V2)).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch(pad_id=0)
    with torch.inference_mode():
        expected = ref(ids, attention_mask=mask).last_hidden_state
        got = fast(ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
    assert packed_calls == [1]
    assert all(prepacked.CACHE_KEY in layer.__dict__ for layer in fast.encoder.layer)  # bertfast::encoder_layer


def test_configs_bertfast_cannot_run_are_refused_and_z_steps_fall_back(one_thread):
    with pytest.raises(ValueError, match="conv_kernel_size=3"):
        bertfast.accelerate(transformers.DebertaV2Model(transformers.DebertaV2Config(**V3, conv_kernel_size=3)))
    model = bertfast.accelerate(build("DebertaV2Model").eval())
    model.z_steps = 2
    assert fallback_reason(model, {}) == "z_steps=2"


@pytest.mark.parametrize("pos_att_type", [["c2p", "p2p"], "None"])
def test_position_terms_other_than_c2p_and_p2c_are_ignored_as_transformers_ignores_them(pos_att_type, packed_calls,
                                                                                       one_thread):
    ref = build("DebertaV2ForSequenceClassification", pos_att_type=pos_att_type)
    fast = bertfast.accelerate(copy.deepcopy(ref))
    inputs, mask = batch("DebertaV2ForSequenceClassification")
    assert_same(run(ref, inputs, mask), run(fast, inputs, mask))
    assert packed_calls == [1]


def test_options_left_to_the_config_are_read_from_it(packed_calls, one_thread):
    """DeBERTa's heads pass output_attentions / output_hidden_states=None down, meaning the config's."""
    ids, mask = ragged_batch(pad_id=0)
    for option, field in (("output_hidden_states", "hidden_states"), ("output_attentions", "attentions")):
        ref = build("DebertaV2ForMaskedLM", **{option: True}).eval()
        fast = bertfast.accelerate(copy.deepcopy(ref))
        expected, got = getattr(ref(ids, attention_mask=mask), field), getattr(fast(ids, attention_mask=mask), field)
        assert got is not None and len(got) == len(expected)
    ref = build("DebertaV2Model", return_dict=False).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    expected, got = ref(ids, attention_mask=mask, return_dict=None), fast(ids, attention_mask=mask, return_dict=None)
    assert isinstance(got, tuple) and len(got) == len(expected)
    assert packed_calls == [1, 1]  # the hidden states and the tuple ran packed; the attentions fell back
