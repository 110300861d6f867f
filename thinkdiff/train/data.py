"""Training batches: a streaming, deterministic, resumable order over a feature store, and the
masked-split collate of REFERENCE.md section 5.

Order: per epoch, the store's row groups are shuffled (seed, epoch) and the rows inside each group
are shuffled too; only one row group is in memory at a time. The position (epoch, samples consumed
in the epoch) is all a checkpoint needs to resume exactly: groups before it are skipped from the
Parquet metadata without being read.

Masked split per sample with L generated tokens: s ~ UniformInt[1, min(L-1, max_source_rows)];
feature rows [:s] are the aligner's input; Qwen ids [s:] decoded to text and re-tokenized with the
T5 tokenizer (with </s>, at most max_target_tokens) are the target, padded with -100. The split
RNG is keyed by (seed, step), so a resumed run draws the same splits.

Shape legend: B batch, S source rows, D feature width, T target tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from thinkdiff.data.features import FeatureStore, decode_features
from thinkdiff.models.t5 import IGNORE_INDEX

COLUMNS = ("token_ids", "text", "num_rows", "features")


@dataclass
class StreamPosition:
    epoch: int = 0
    index: int = 0
    """Samples of this epoch already consumed (valid or not)."""


@dataclass
class Sample:
    token_ids: list[int]
    features_LD: torch.Tensor
    text: str = ""


@dataclass
class Batch:
    features_BSD: torch.Tensor
    source_mask_BS: torch.Tensor
    labels_BT: torch.Tensor
    prefix_ids_BP: torch.Tensor | None = None
    """ThinkDiff-CLIP: caption part 1 for the frozen T5 encoder (P tokens), appended after the aligned rows."""
    prefix_mask_BP: torch.Tensor | None = None

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels_BT != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


class SampleStream:
    """Endless sample stream over a feature store, starting at a saved position."""

    def __init__(self, store: FeatureStore, seed: int, position: StreamPosition, usable: Callable[[Sample], bool]):
        self.store = store
        self.usable = usable
        self.seed = seed
        self.position = StreamPosition(position.epoch, position.index)
        self.units = store.row_groups()
        if sum(n for _, _, n in self.units) == 0:
            raise ValueError(f"{store.directory}: the feature store holds no samples")

    def __iter__(self) -> Iterator[Sample]:
        info = self.store.info
        while True:
            usable, full_epoch = 0, self.position.index == 0
            rng = random.Random(f"{self.seed}:epoch:{self.position.epoch}")
            order = list(range(len(self.units)))
            rng.shuffle(order)
            start = 0
            for unit in order:
                shard, group, rows = self.units[unit]
                if start + rows <= self.position.index:
                    start += rows
                    continue
                table = self.store.read_row_group(shard, group, COLUMNS)
                row_order = list(range(rows))
                random.Random(f"{self.seed}:epoch:{self.position.epoch}:unit:{unit}").shuffle(row_order)
                token_ids = table.column("token_ids").to_pylist()
                texts = table.column("text").to_pylist()
                num_rows = table.column("num_rows").to_pylist()
                blobs = table.column("features").chunks
                flat = [b for chunk in blobs for b in chunk]
                for offset in range(self.position.index - start, rows):
                    row = row_order[offset]
                    self.position.index = start + offset + 1
                    sample = Sample(token_ids[row], decode_features(flat[row].as_buffer(), num_rows[row], info.dim, info.dtype), texts[row])
                    if not self.usable(sample):
                        continue  # nothing to split (e.g. one generated token, a one-word caption)
                    usable += 1
                    yield sample
                start += rows
            if usable == 0 and full_epoch:
                raise ValueError(f"{self.store.directory}: no sample can be split into source and target; nothing to train on")
            self.position = StreamPosition(self.position.epoch + 1, 0)


class MaskedSplitCollator:
    def __init__(
        self,
        vlm_tokenizer: PreTrainedTokenizerBase,
        t5_tokenizer: PreTrainedTokenizerBase,
        *,
        max_source_rows: int,
        max_target_tokens: int,
        seed: int,
    ):
        self.vlm_tokenizer = vlm_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.max_source_rows = max_source_rows
        self.max_target_tokens = max_target_tokens
        self.seed = seed

    def split_points(self, lengths: list[int], step: int) -> list[int]:
        rng = np.random.default_rng([self.seed, step])
        return [int(rng.integers(1, min(n - 1, self.max_source_rows), endpoint=True)) for n in lengths]

    def __call__(self, samples: list[Sample], step: int) -> Batch:
        splits = self.split_points([len(s.token_ids) for s in samples], step)
        width = max(splits)
        dim = samples[0].features_LD.shape[1]
        features = torch.zeros(len(samples), width, dim, dtype=samples[0].features_LD.dtype)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        for i, (sample, s) in enumerate(zip(samples, splits, strict=True)):
            features[i, :s] = sample.features_LD[:s]
            mask[i, :s] = 1
        texts = [self.vlm_tokenizer.decode(s.token_ids[k:], skip_special_tokens=True) for s, k in zip(samples, splits, strict=True)]
        target = self.t5_tokenizer(
            texts, max_length=self.max_target_tokens, truncation=True, padding="longest", return_tensors="pt"
        )
        labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, IGNORE_INDEX)
        return Batch(features_BSD=features, source_mask_BS=mask, labels_BT=labels)


def lvlm_usable(sample: Sample) -> bool:
    return len(sample.token_ids) >= 2


def clip_usable(sample: Sample) -> bool:
    return len(sample.text.split()) >= 2


class CaptionSplitCollator:
    """ThinkDiff-CLIP (REFERENCE.md section 5): the caption split at a uniformly random word; part 1
    (at most max_prefix_tokens) goes through the frozen T5 encoder after the aligned image tokens,
    part 2 (at most max_target_tokens, with </s>) is the target."""

    def __init__(self, t5_tokenizer: PreTrainedTokenizerBase, *, max_prefix_tokens: int, max_target_tokens: int, seed: int):
        self.t5_tokenizer = t5_tokenizer
        self.max_prefix_tokens = max_prefix_tokens
        self.max_target_tokens = max_target_tokens
        self.seed = seed

    def split(self, text: str, rng: np.random.Generator) -> tuple[str, str]:
        words = text.split()
        k = int(rng.integers(1, len(words) - 1, endpoint=True))
        return " ".join(words[:k]), " ".join(words[k:])

    def __call__(self, samples: list[Sample], step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        parts = [self.split(s.text, rng) for s in samples]
        features = torch.stack([s.features_LD for s in samples])  # every image has the same token count
        prefix = self.t5_tokenizer([p for p, _ in parts], max_length=self.max_prefix_tokens, truncation=True,
                                   padding="longest", return_tensors="pt")
        target = self.t5_tokenizer([t for _, t in parts], max_length=self.max_target_tokens, truncation=True,
                                   padding="longest", return_tensors="pt")
        return Batch(
            features_BSD=features,
            source_mask_BS=torch.ones(features.shape[:2], dtype=torch.long),
            labels_BT=target["input_ids"].masked_fill(target["attention_mask"] == 0, IGNORE_INDEX),
            prefix_ids_BP=prefix["input_ids"],
            prefix_mask_BP=prefix["attention_mask"],
        )


def take(stream: Iterator[Sample], n: int) -> list[Sample]:
    return [next(stream) for _ in range(n)]
