"""From a token cache to model batches: train/eval split, per-epoch instances, rank sharding, masking.

Everything random is drawn from generators seeded by position, not by history:

* held-out documents: a fixed seed (the same eval set for every training seed),
* the instances of epoch ``e`` and their order: ``(seed, e)``,
* the masks of batch ``i`` of epoch ``e`` on rank ``r``: ``(seed, e, i, r)``.

So the data at any point of training is a function of (seed, epoch, batch index), which is what
makes resuming exact, and DataLoader workers need no shared state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from bertfast.data.cache import TokenizedCorpus
from bertfast.data.corpus import CorpusError
from bertfast.data.instances import (
    IS_RANDOM_NEXT,
    SPECIAL_TOKENS_PER_PAIR,
    create_instances,
    instance_tokens,
    own_document_tokens,
    segment_limit,
)
from bertfast.data.masking import IGNORE_INDEX, MaskingCollator
from bertfast.data.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer

EVAL_SEED = 20181011  # fixed: the held-out documents and eval batches do not depend on the run's seed
_EVAL_PASSES = 5  # instance/mask draws over the held-out documents, for a steadier estimate


def make_collator(tokenizer: WordPieceTokenizer, mask_prob: float = 0.15, mask_token_prob: float = 0.8,
                  random_token_prob: float = 0.1, whole_word: bool = False) -> MaskingCollator:
    special = [tokenizer.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    return MaskingCollator(
        pad_id=tokenizer.pad_id, mask_id=tokenizer.mask_id, special_ids=np.asarray(special, dtype=np.int64),
        replacement_ids=tokenizer.replacement_ids(), continuation=tokenizer.continuation_mask(),
        mask_prob=mask_prob, mask_token_prob=mask_token_prob, random_token_prob=random_token_prob,
        whole_word=whole_word,
    )


@dataclass(eq=False)
class EpochBatches(Dataset):
    """Batch ``i`` of one epoch for one rank: masked, padded tensors (a map-style dataset of batches)."""

    corpus: TokenizedCorpus
    instances: np.ndarray
    collator: MaskingCollator
    cls_id: int
    sep_id: int
    batch_size: int
    seed: int
    epoch: int
    rank: int = 0
    world_size: int = 1

    def __len__(self) -> int:
        return len(self.instances) // (self.batch_size * self.world_size)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        # Global batch `index` is world_size * batch_size consecutive instances; each rank takes a slice.
        start = (index * self.world_size + self.rank) * self.batch_size
        rows = self.instances[start:start + self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, index, self.rank])
        sequences = [instance_tokens(self.corpus, row, self.cls_id, self.sep_id) for row in rows]
        return self.collator(sequences, rows[:, IS_RANDOM_NEXT], rng)


class PretrainingData:
    """The train/eval split of a tokenised corpus and the batches of each epoch."""

    def __init__(self, corpus: TokenizedCorpus, tokenizer: WordPieceTokenizer, collator: MaskingCollator, *,
                 batch_size: int, max_seq_len: int = 128, short_seq_prob: float = 0.1,
                 eval_fraction: float = 0.05, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.collator = collator
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.short_seq_prob = short_seq_prob
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        n_docs = len(corpus)
        n_eval = min(n_docs - 1, round(n_docs * eval_fraction)) if eval_fraction > 0 else 0
        if eval_fraction > 0 and n_eval == 0 and n_docs >= 2:
            n_eval = 1
        order = np.random.default_rng(EVAL_SEED).permutation(n_docs)
        self.eval_docs = np.sort(order[:n_eval])
        self.train_docs = np.sort(order[n_eval:])
        self._epoch: tuple[int, np.ndarray] | None = None

    def epoch_instances(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch = (epoch, create_instances(self.corpus, self.train_docs, self.max_seq_len,
                                                   self.short_seq_prob, rng))
        return self._epoch[1]

    def epoch(self, epoch: int) -> EpochBatches:
        batches = EpochBatches(self.corpus, self.epoch_instances(epoch), self.collator, self.tokenizer.cls_id,
                               self.tokenizer.sep_id, self.batch_size, self.seed, epoch, self.rank,
                               self.world_size)
        if len(batches) == 0:
            raise CorpusError(
                f"epoch {epoch} has {len(batches.instances)} instances, fewer than one batch of "
                f"{self.batch_size} x {self.world_size} process(es); use a larger corpus or a smaller batch"
            )
        return batches

    def eval_batches(self, max_instances: int = 2048) -> list[dict[str, Tensor]]:
        """This rank's share of the fixed held-out batches (empty without held-out documents)."""
        if len(self.eval_docs) == 0:
            return []
        parts = [create_instances(self.corpus, self.eval_docs, self.max_seq_len, self.short_seq_prob,
                                  np.random.default_rng([EVAL_SEED, p])) for p in range(_EVAL_PASSES)]
        instances = np.concatenate(parts)[:max_instances][self.rank::self.world_size]
        batches = []
        for i, start in enumerate(range(0, len(instances), self.batch_size)):
            rows = instances[start:start + self.batch_size]
            sequences = [instance_tokens(self.corpus, row, self.tokenizer.cls_id, self.tokenizer.sep_id)
                         for row in rows]
            rng = np.random.default_rng([EVAL_SEED, i, self.rank])
            batches.append(self.collator(sequences, rows[:, IS_RANDOM_NEXT], rng))
        return batches

    def report(self) -> CorpusReport:
        """Documents, sentences and tokens of the corpus, and how many of them epoch 0's instances use."""
        lengths = [np.diff(shard.sentences) for shard in self.corpus.shards]
        per_doc = [np.diff(shard.documents) for shard in self.corpus.shards]
        eval_tokens = 0
        for doc in self.eval_docs:
            _, bounds = self.corpus.sentence_bounds(int(doc))
            eval_tokens += int(bounds[-1] - bounds[0])
        limit = segment_limit(self.max_seq_len)
        tokens = int(sum(int(x.sum()) for x in lengths))
        instances = self.epoch_instances(0)
        return CorpusReport(
            documents=len(self.corpus), eval_documents=len(self.eval_docs),
            sentences=int(sum(len(x) for x in lengths)),
            single_sentence_documents=int(sum(int((x == 1).sum()) for x in per_doc)),
            long_sentences=int(sum(int((x > self.max_seq_len - SPECIAL_TOKENS_PER_PAIR).sum()) for x in lengths)),
            segment_tokens=limit,
            tokens=tokens, train_tokens=tokens - eval_tokens, used_tokens=own_document_tokens(instances),
            instances=len(instances),
        )

    def most_frequent_token(self) -> int:
        """The most frequent maskable token of the training documents (the MLM accuracy baseline)."""
        counts = self.corpus.counts.copy()
        for doc in self.eval_docs:
            shard, bounds = self.corpus.sentence_bounds(int(doc))
            tokens = self.corpus.tokens(shard, int(bounds[0]), int(bounds[-1]))
            counts -= np.bincount(tokens, minlength=len(counts))
        counts[self.collator.special_ids] = -1
        return int(np.argmax(counts))


@dataclass
class CorpusReport:
    """How much of a corpus reaches training, and what looks wrong with it (shown before training)."""

    documents: int
    eval_documents: int
    sentences: int
    single_sentence_documents: int
    long_sentences: int  # longer than a whole instance
    segment_tokens: int
    tokens: int
    train_tokens: int
    used_tokens: int
    instances: int

    @property
    def truncated_share(self) -> float:
        return 1.0 - self.used_tokens / self.train_tokens if self.train_tokens else 0.0

    def lines(self) -> list[str]:
        return [f"corpus report: {self.documents:,} documents ({self.eval_documents:,} held out), "
                f"{self.sentences:,} sentences, {self.tokens:,} tokens read; an epoch's {self.instances:,} "
                f"instances use {self.used_tokens:,} of the {self.train_tokens:,} training tokens "
                f"({self.truncated_share:.1%} truncated)"]

    def warnings(self) -> list[str]:
        found = []
        if self.eval_documents == 0:
            found.append(f"{self.documents} document(s): no held-out documents, so no evaluation, and NSP has no "
                         "other document to draw random sentences from; separate documents with blank lines "
                         "(text) or use one JSONL line per document")
        if self.documents and self.single_sentence_documents > self.documents / 2:
            found.append(f"{self.single_sentence_documents:,} of {self.documents:,} documents have one sentence: "
                         "their NSP pairs are halves of one sentence, not two sentences")
        if self.long_sentences:
            found.append(f"{self.long_sentences:,} sentences are longer than a whole instance (no sentence "
                         f"ends?); they are cut into segments of {self.segment_tokens} tokens at most")
        if self.truncated_share > 0.2:
            found.append(f"{self.truncated_share:.0%} of the training tokens are truncated away in every epoch")
        return found


def baseline_accuracy(batches: list[dict[str, Tensor]], token: int) -> tuple[int, int]:
    """(hits, masked tokens): how often predicting ``token`` everywhere is right on these batches."""
    hits = total = 0
    for batch in batches:
        labels = batch["labels"]
        masked = labels != IGNORE_INDEX
        hits += int((labels[masked] == token).sum())
        total += int(masked.sum())
    return hits, total
