"""Dynamic masking for MLM: a collator that pads a list of sequences and masks them afresh each batch.

Of the real tokens of a sequence (not [CLS]/[SEP]/[PAD] or another special token), ``mask_prob``
are chosen (at least one when there is one); of those, ``mask_token_prob`` become [MASK],
``random_token_prob`` a random non-special token and the rest stay as they are. Labels hold the
original id at chosen positions and ``IGNORE_INDEX`` (-100) elsewhere. With ``whole_word`` the choice is made over
words (a token plus its ``##`` continuation pieces), so a word is masked whole or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bertfast.common import IGNORE_INDEX


@dataclass
class MaskingCollator:
    pad_id: int
    mask_id: int
    special_ids: np.ndarray  # never chosen
    replacement_ids: np.ndarray  # candidates for the random replacement
    continuation: np.ndarray  # continuation[id]: the token continues the previous word (##...)
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    whole_word: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {self.mask_prob}")
        if min(self.mask_token_prob, self.random_token_prob) < 0 or \
                self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError("mask_token_prob and random_token_prob must be >= 0 and sum to at most 1")
        self._maskable = np.ones(len(self.continuation), dtype=bool)
        self._maskable[self.special_ids] = False

    def choose(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Positions of ``ids`` to predict (sorted)."""
        candidates = np.flatnonzero(self._maskable[ids])
        if len(candidates) == 0:
            return candidates
        wanted = max(1, round(len(candidates) * self.mask_prob))
        if not self.whole_word:
            return np.sort(rng.choice(candidates, size=wanted, replace=False))
        # A word starts at a candidate that is not a continuation piece or that follows a non-candidate.
        starts = ~self.continuation[ids[candidates]]
        starts[0] = True
        starts[1:] |= np.diff(candidates) > 1
        words = np.split(candidates, np.flatnonzero(starts)[1:])
        chosen: list[np.ndarray] = []
        count = 0
        for w in rng.permutation(len(words)):
            # As BERT: skip a word that would overshoot the budget, keep looking for smaller ones.
            if count + len(words[w]) <= wanted:
                chosen.append(words[w])
                count += len(words[w])
            if count == wanted:
                break
        if not chosen:  # every word is longer than the budget: take one anyway
            chosen.append(words[int(rng.integers(len(words)))])
        return np.sort(np.concatenate(chosen))

    def mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(masked input ids, labels) of one sequence."""
        positions = self.choose(ids, rng)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[positions] = ids[positions]
        masked = ids.copy()
        draw = rng.random(len(positions))
        to_mask = positions[draw < self.mask_token_prob]
        to_random = positions[(draw >= self.mask_token_prob) &
                              (draw < self.mask_token_prob + self.random_token_prob)]
        masked[to_mask] = self.mask_id
        masked[to_random] = rng.choice(self.replacement_ids, size=len(to_random))
        return masked, labels

    def __call__(self, sequences: list[tuple[np.ndarray, np.ndarray]], next_sentence_labels: np.ndarray,
                 rng: np.random.Generator) -> dict[str, Tensor]:
        """Mask and pad ``(input ids, token type ids)`` pairs to the longest into a model batch."""
        length = max(len(ids) for ids, _ in sequences)
        batch = len(sequences)
        input_ids = np.full((batch, length), self.pad_id, dtype=np.int64)
        token_type_ids = np.zeros((batch, length), dtype=np.int64)
        attention_mask = np.zeros((batch, length), dtype=np.int64)
        labels = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
        for row, (ids, types) in enumerate(sequences):
            n = len(ids)
            input_ids[row, :n], labels[row, :n] = self.mask(ids, rng)
            token_type_ids[row, :n] = types
            attention_mask[row, :n] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
            "next_sentence_label": torch.from_numpy(np.asarray(next_sentence_labels, dtype=np.int64)),
        }
