"""Dynamic MLM masking: rates, 80/10/10 split, specials and padding never chosen, whole-word groups."""

import numpy as np
import pytest
import torch

from bertfast.data.masking import IGNORE_INDEX, MaskingCollator

PAD, UNK, CLS, SEP, MASK = range(5)
VOCAB = 100
CONTINUATION = np.zeros(VOCAB, dtype=bool)
CONTINUATION[50:] = True  # ids 50.. are "##" pieces


def collator(**kwargs) -> MaskingCollator:
    return MaskingCollator(pad_id=PAD, mask_id=MASK, special_ids=np.arange(5),
                           replacement_ids=np.arange(5, VOCAB), continuation=CONTINUATION, **kwargs)


def random_pair(rng, len_a, len_b):
    a = rng.integers(5, 50, len_a)
    b = rng.integers(5, 50, len_b)
    ids = np.concatenate(([CLS], a, [SEP], b, [SEP]))
    types = np.r_[np.zeros(len_a + 2, np.int64), np.ones(len_b + 1, np.int64)]
    return ids, types


def test_batch_is_padded_and_specials_and_padding_are_never_chosen():
    rng = np.random.default_rng(0)
    sequences = [random_pair(rng, int(rng.integers(1, 30)), int(rng.integers(1, 30))) for _ in range(200)]
    batch = collator()(sequences, np.arange(200) % 2, np.random.default_rng(1))
    length = max(len(ids) for ids, _ in sequences)
    assert batch["input_ids"].shape == (200, length)
    for row, (ids, types) in enumerate(sequences):
        n = len(ids)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (length - n)
        assert (batch["input_ids"][row, n:] == PAD).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["token_type_ids"][row, :n].tolist() == types.tolist()
        chosen = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().numpy()
        assert len(chosen) >= 1
        assert not np.isin(ids[chosen], [CLS, SEP]).any()
        np.testing.assert_array_equal(batch["labels"][row, chosen].numpy(), ids[chosen])
        unchosen = np.setdiff1d(np.arange(n), chosen)
        np.testing.assert_array_equal(batch["input_ids"][row, unchosen].numpy(), ids[unchosen])
    assert batch["next_sentence_label"].tolist() == (np.arange(200) % 2).tolist()
    assert all(t.dtype == torch.int64 for t in batch.values())


@pytest.mark.parametrize("probs", [(0.15, 0.8, 0.1), (0.3, 0.5, 0.25)])
def test_rates_match_the_configured_probabilities(probs):
    mask_prob, mask_token_prob, random_token_prob = probs
    masker = collator(mask_prob=mask_prob, mask_token_prob=mask_token_prob,
                      random_token_prob=random_token_prob)
    rng = np.random.default_rng(0)
    chosen = masked = randomised = kept = real = 0
    for _ in range(400):
        ids, _ = random_pair(rng, 60, 60)
        inputs, labels = masker.mask(ids, rng)
        positions = labels != IGNORE_INDEX
        real += len(ids) - 3
        chosen += positions.sum()
        masked += (inputs[positions] == MASK).sum()
        kept += (inputs[positions] == ids[positions]).sum()
        randomised += ((inputs[positions] != MASK) & (inputs[positions] != ids[positions])).sum()
        assert not np.isin(inputs[positions], [PAD, UNK, CLS, SEP]).any()
    assert chosen / real == pytest.approx(mask_prob, abs=0.005)
    assert masked / chosen == pytest.approx(mask_token_prob, abs=0.02)
    # A random replacement can draw the original id (1 in 95 here), which then counts as kept.
    keep_prob = 1 - mask_token_prob - random_token_prob
    assert randomised / chosen == pytest.approx(random_token_prob * 94 / 95, abs=0.02)
    assert kept / chosen == pytest.approx(keep_prob + random_token_prob / 95, abs=0.02)


def test_short_sequences_still_get_one_prediction():
    masker = collator()
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids, _ = random_pair(rng, 1, 1)
        _, labels = masker.mask(ids, rng)
        assert (labels != IGNORE_INDEX).sum() == 1
    assert (masker.mask(np.array([CLS, SEP, SEP]), rng)[1] == IGNORE_INDEX).all()  # nothing to choose


def words_of(ids):
    """Word index of each position: a new word at every non-continuation token or after a special."""
    word, out = -1, []
    for i, t in enumerate(ids):
        if t < 5:
            out.append(-1)
            continue
        if not CONTINUATION[t] or ids[i - 1] < 5:
            word += 1
        out.append(word)
    return np.array(out)


def test_whole_word_masking_chooses_complete_words():
    masker = collator(whole_word=True)
    rng = np.random.default_rng(0)
    chosen_total = real_total = 0
    for _ in range(300):
        # Words of 1-4 pieces: a head id < 50 then continuation ids >= 50; B may start mid-word.
        pieces = []
        for _ in range(40):
            pieces.append(int(rng.integers(5, 50)))
            pieces.extend(int(x) for x in rng.integers(50, VOCAB, int(rng.integers(0, 4))))
        ids = np.array([CLS, *pieces[:50], SEP, *pieces[50:90], SEP])
        _, labels = masker.mask(ids, rng)
        words = words_of(ids)
        chosen = labels != IGNORE_INDEX
        for w in np.unique(words[chosen]):
            assert chosen[words == w].all(), "a word was masked only in part"
        chosen_total += chosen.sum()
        real_total += (words >= 0).sum()
    assert chosen_total / real_total == pytest.approx(0.15, abs=0.02)


def test_masks_depend_only_on_the_generator():
    masker = collator()
    ids, types = random_pair(np.random.default_rng(0), 40, 40)
    first = masker([(ids, types)], np.array([0]), np.random.default_rng(5))
    again = masker([(ids, types)], np.array([0]), np.random.default_rng(5))
    other = masker([(ids, types)], np.array([0]), np.random.default_rng(6))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["labels"], other["labels"])


def test_invalid_probabilities_are_rejected():
    with pytest.raises(ValueError, match="mask_prob"):
        collator(mask_prob=0.0)
    with pytest.raises(ValueError, match="sum to at most 1"):
        collator(mask_token_prob=0.8, random_token_prob=0.3)
