"""Training batches: a streaming, deterministic, resumable order over a feature store, and the
masked-split collate (docs/method.md, Training).

Order: per epoch, the store's row groups are shuffled (seed, epoch) and the rows inside each group
are shuffled too; the stream reads one row group at a time, and samples keep their features
encoded (views of their row group's Arrow buffers) until a batch decodes them. The position
(epoch, samples consumed in the epoch) is all a checkpoint needs to resume exactly: groups
before it are skipped from the Parquet metadata without being read.

Masked split per sample with L generated tokens: s ~ UniformInt[1, min(L-1, max_source_rows)];
feature rows [:s] are the aligner's input; Qwen ids [s:] decoded to text and re-tokenized with the
T5 tokenizer (with </s>, at most max_target_tokens) are the target, padded with -100. The split
RNG is keyed by (seed, step), so a resumed run draws the same splits.

Loss weight: the official release draws plain shuffled batches and takes each one's token-mean
loss; a random batch holds about the mean number of target tokens, so every target token weighs
about the same, whatever its sample's length. Length-bucketed batches (`Batcher`) hold targets of
near-equal length: the token mean of each would weigh a token of a short-target batch more than
one of a long-target batch. So a batch carries `loss_tokens`, what its summed token loss is
divided by: the mean target tokens per global batch over its bucketing pool (a random draw of
`window` global batches: what a random batch holds on average), this process's share of it. Over
a pool every token then weighs the same, as over plain random batches; `window=1` keeps each
global batch's own token mean. Deterministic, as the pool is: a resumed run weighs alike.

Shape legend: B batch, S source slots (each sample's rows, padded to the longest), R source rows of
the batch (packed, no padding), D feature width, T target tokens.
"""

from __future__ import annotations

import queue
import random
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from thinkdiff.data.features import FeatureStore, StoredFeatures, binary_values, decoded_dtype
from thinkdiff.models.t5 import IGNORE_INDEX, target_positions

COLUMNS = ("token_ids", "text", "num_rows", "features")
DECODE_THREADS = 4
"""Threads decoding a batch's features into it (float8: about 1 ms of CPU per 128 x 3584 rows)."""


@dataclass
class StreamPosition:
    epoch: int = 0
    index: int = 0
    """Samples of this epoch already consumed (valid or not)."""


@dataclass
class Sample:
    token_ids: list[int]
    features: StoredFeatures
    """Still encoded: a batch decodes only the rows it uses, straight into itself."""
    text: str = ""


@dataclass
class Batch:
    features_RD: torch.Tensor
    """The samples' source rows, packed: no padding is read, copied to the GPU or aligned."""
    source_slots_BS: torch.Tensor
    """Sample b's rows in `features_RD`, by row number, then -1 (padding; `T5DecoderLM.loss`)."""
    labels_BT: torch.Tensor
    prefix_ids_BP: torch.Tensor | None = None
    """ThinkDiff-CLIP: caption part 1 for the frozen T5 encoder (P tokens), appended after the aligned rows."""
    prefix_mask_BP: torch.Tensor | None = None
    target_positions_N: torch.Tensor | None = None
    """Where the real target tokens sit in `labels_BT.flatten()`; made with the batch, on the CPU,
    so neither the loss nor the token count makes the CPU wait for the GPU."""
    loss_tokens: float | None = None
    """What this batch's summed token loss is divided by (module docstring, Loss weight): this
    process's share (1 / processes) of the mean target tokens per global batch over its bucketing
    pool; None: the batch's own target tokens (its token mean)."""

    def __post_init__(self):
        if self.target_positions_N is None:
            self.target_positions_N = target_positions(self.labels_BT)

    @property
    def source_mask_BS(self) -> torch.Tensor:
        return (self.source_slots_BS >= 0).long()

    @property
    def num_target_tokens(self) -> int:
        return len(self.target_positions_N)

    @property
    def loss_weight(self) -> float:
        """The factor that turns the batch's token-mean loss into its summed token loss over
        `loss_tokens` (exactly 1 when that is the batch's own count)."""
        return 1.0 if self.loss_tokens is None else self.num_target_tokens / self.loss_tokens

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        move = lambda x: x.to(device, non_blocking=non_blocking) if isinstance(x, torch.Tensor) else x  # noqa: E731
        return Batch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


class SampleStream:
    """Endless sample stream over a feature store, starting at a saved position."""

    def __init__(self, store: FeatureStore, seed: int, position: StreamPosition, usable: Callable[[Sample], bool]):
        self.store = store
        self.usable = usable
        self.seed = seed
        self.position = StreamPosition(position.epoch, position.index)
        self.units = store.units
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
                blobs = binary_values(table.column("features"))
                for offset in range(self.position.index - start, rows):
                    row = row_order[offset]
                    self.position.index = start + offset + 1
                    sample = Sample(token_ids[row], StoredFeatures(blobs[row], num_rows[row], info.dim, info.dtype),
                                    texts[row])
                    if not self.usable(sample):
                        continue  # nothing to split (e.g. one generated token, an empty caption)
                    usable += 1
                    yield sample
                start += rows
            if usable == 0 and full_epoch:
                raise ValueError(f"{self.store.directory}: no sample can be split into source and target; "
                                 "nothing to train on")
            self.position = StreamPosition(self.position.epoch + 1, 0)


@dataclass
class Prepared:
    """One sample after its split: what the aligner reads (the first `source_rows` rows of its
    features), what the decoder must predict."""

    features: StoredFeatures
    source_rows: int
    target_ids: list[int]
    prefix_ids: list[int] | None = None
    """ThinkDiff-CLIP: caption part 1 for the T5 encoder."""

    @property
    def cost(self) -> tuple[int, int]:
        """The bucketing key: target tokens (the decoder runs over them, padding included), then
        source rows (+ prefix tokens), which only break ties: they are packed."""
        return len(self.target_ids), self.source_rows + len(self.prefix_ids or ())


def pad(prepared: list[Prepared], pad_id: int, pin_memory: bool = False, decoders: Executor | None = None) -> Batch:
    """The batch of `prepared`: source rows packed (no padding), targets padded to the longest
    with -100.

    Each sample's source rows are decoded from the store's bytes straight into the batch (on the
    `decoders` threads if given: numpy releases the GIL), and only those rows.

    `pin_memory`: the batch in page-locked memory, whose copy to the GPU runs asynchronously; the
    features (all but a few KB) are decoded straight into it, no second, pinning copy. PyTorch
    caches pinned blocks by power-of-two size, so a run soon stops allocating: it keeps about the
    prefetch depth's worth of blocks per size class it meets (about 8 GB at `paper-lvlm`'s batch
    of 96 in one process; less per process on more GPUs).
    """
    rows = [p.source_rows for p in prepared]
    first = np.cumsum([0, *rows[:-1]]).tolist()
    stored = prepared[0].features
    features = torch.empty(sum(rows), stored.dim, dtype=decoded_dtype(stored.dtype), pin_memory=pin_memory)
    slots = torch.full((len(prepared), max(rows)), -1, dtype=torch.long)
    labels = torch.full((len(prepared), max(len(p.target_ids) for p in prepared)), IGNORE_INDEX, dtype=torch.long)

    def fill(i: int) -> None:
        prepared[i].features.decode(rows[i], out=features[first[i]: first[i] + rows[i]])

    list((decoders.map if decoders else map)(fill, range(len(prepared))))  # list(): run them all
    for i, p in enumerate(prepared):
        slots[i, : rows[i]] = torch.arange(first[i], first[i] + rows[i])
        labels[i, : len(p.target_ids)] = torch.tensor(p.target_ids)
    batch = Batch(features_RD=features, source_slots_BS=slots, labels_BT=labels)
    if prepared[0].prefix_ids is not None:
        width_p = max(len(p.prefix_ids) for p in prepared)
        batch.prefix_ids_BP = torch.full((len(prepared), width_p), pad_id, dtype=torch.long)
        batch.prefix_mask_BP = torch.zeros((len(prepared), width_p), dtype=torch.long)
        for i, p in enumerate(prepared):
            batch.prefix_ids_BP[i, : len(p.prefix_ids)] = torch.tensor(p.prefix_ids)
            batch.prefix_mask_BP[i, : len(p.prefix_ids)] = 1
    if pin_memory:  # the few KB of masks, labels and positions too: a copy from pageable memory can wait
        fields = (getattr(batch, name) for name in Batch.__dataclass_fields__)
        batch = Batch(*(x.pin_memory() if isinstance(x, torch.Tensor) and not x.is_pinned() else x for x in fields))
    return batch


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
        return [self.split_point(n, rng) for n in lengths]

    def split_point(self, length: int, rng: np.random.Generator) -> int:
        return int(rng.integers(1, min(length - 1, self.max_source_rows), endpoint=True))

    def prepare(self, sample: Sample, rng: np.random.Generator) -> Prepared:
        s = self.split_point(len(sample.token_ids), rng)
        text = self.vlm_tokenizer.decode(sample.token_ids[s:], skip_special_tokens=True)
        target = self.t5_tokenizer(text, max_length=self.max_target_tokens, truncation=True)["input_ids"]
        return Prepared(features=sample.features, source_rows=s, target_ids=target)

    def __call__(self, samples: list[Sample], step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        return pad([self.prepare(s, rng) for s in samples], self.t5_tokenizer.pad_token_id)


def lvlm_usable(sample: Sample) -> bool:
    return len(sample.token_ids) >= 2


BLIP_MAX_WORDS = 50
"""BlipCaptionProcessor's default `max_words`, which the release's training config keeps."""


def blip_caption(text: str, max_words: int = BLIP_MAX_WORDS) -> str:
    """`text` as BLIP's caption processor hands it to the release's ThinkDiff-CLIP training (LAVIS,
    lavis/processors/blip_processors.py, `BlipCaptionProcessor.pre_caption`; the release's copy in
    thinkdiff/processors/blip_processors.py at 3ed85e6): lower case, each of . ! " ( ) * # : ; ~
    replaced by a space, every run of two or more whitespace characters made one space, a trailing
    newline and the spaces at both ends removed, then at most `max_words` space-separated words."""
    text = re.sub(r"\s{2,}", " ", re.sub(r'[.!"()*#:;~]', " ", text.lower()))
    words = text.rstrip("\n").strip(" ").split(" ")
    return " ".join(words[:max_words])


class CaptionSplitCollator:
    """ThinkDiff-CLIP (docs/method.md, ThinkDiff-CLIP): the caption (normalised as BLIP's caption processor
    does, with `blip_captions`) split at a uniformly random word; part 1 (at most max_prefix_tokens)
    goes through the frozen T5 encoder after the aligned image tokens, part 2 (at most
    max_target_tokens, with </s>) is the target. A one-word caption is all part 2, and part 1 the
    tokenized empty string (T5: </s> alone), as the release's `random_split_string`
    (thinkdiff/models/blip_vision_t5_decoder.py at 3ed85e6, lines 247-255) splits it."""

    def __init__(self, t5_tokenizer: PreTrainedTokenizerBase, *, max_prefix_tokens: int, max_target_tokens: int,
                 seed: int, blip_captions: bool = False):
        self.t5_tokenizer = t5_tokenizer
        self.max_prefix_tokens = max_prefix_tokens
        self.max_target_tokens = max_target_tokens
        self.seed = seed
        self.blip_captions = blip_captions

    def caption(self, text: str) -> str:
        """The caption the split reads (`train.blip_captions`)."""
        return blip_caption(text) if self.blip_captions else text

    def usable(self, sample: Sample) -> bool:
        """A caption with a word to predict (the release would train an empty one on </s> alone)."""
        return bool(self.caption(sample.text).split())

    def split(self, text: str, rng: np.random.Generator) -> tuple[str, str]:
        words = text.split()
        k = int(rng.integers(1, len(words) - 1, endpoint=True)) if len(words) > 1 else 0
        return " ".join(words[:k]), " ".join(words[k:])

    def prepare(self, sample: Sample, rng: np.random.Generator) -> Prepared:
        part1, part2 = self.split(self.caption(sample.text), rng)
        return Prepared(
            features=sample.features,
            source_rows=sample.features.num_rows,  # every image has the same token count
            target_ids=self.t5_tokenizer(part2, max_length=self.max_target_tokens, truncation=True)["input_ids"],
            prefix_ids=self.t5_tokenizer(part1, max_length=self.max_prefix_tokens, truncation=True)["input_ids"],
        )

    def __call__(self, samples: list[Sample], step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        return pad([self.prepare(s, rng) for s in samples], self.t5_tokenizer.pad_token_id)


@dataclass
class BatcherState:
    epoch: int = 0
    index: int = 0
    """Stream position where the current pool starts."""
    pool: int = 0
    emitted: int = 0
    """Batches of the current pool already handed out."""


class Batcher:
    """Length-bucketed global batches, resumable exactly.

    A pool of `window` global batches is drawn from the stream, each sample split (RNG keyed by
    seed and pool number), grouped by length (`length_buckets`) into global batches whose order is
    shuffled; each of the `world` processes takes its `batch_size / world` slice, so a global batch
    and the data order are the same on any number of processes. Similar lengths in a batch means little
    padding; `window=1` keeps the stream order (no bucketing). Each batch's `loss_tokens` is its
    process's share of the pool's mean target tokens per global batch (module docstring, Loss
    weight): with gradients averaged over the processes, a step's gradient is the global batch's
    summed token loss over that mean. The state (pool start, pool number,
    batches emitted) is all a checkpoint needs. A batch decodes the features of its own samples
    only, on DECODE_THREADS threads; the rest of the pool stays encoded until its batch comes.
    `pin_memory`: features padded into page-locked memory (for a GPU).
    """

    def __init__(self, store: FeatureStore, collator, usable: Callable[[Sample], bool], *, seed: int, batch_size: int,
                 world: int, rank: int, window: int, state: BatcherState, pin_memory: bool = False):
        self.store, self.collator, self.usable = store, collator, usable
        self.seed, self.batch_size, self.world, self.rank, self.window = seed, batch_size, world, rank, window
        self.state = BatcherState(**state.__dict__)
        self.pin_memory = pin_memory
        if batch_size % world:
            raise ValueError(f"a global batch of {batch_size} does not split over {world} processes")
        self.per_process = batch_size // world

    def __iter__(self) -> Iterator[Batch]:
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode") as decoders:
            yield from self._batches(decoders)

    def _batches(self, decoders: Executor) -> Iterator[Batch]:
        while True:
            start = self.state
            stream = SampleStream(self.store, self.seed, StreamPosition(start.epoch, start.index), self.usable)
            pool = take(iter(stream), self.window * self.batch_size)
            rng = np.random.default_rng([self.seed, start.pool])
            prepared = [self.collator.prepare(sample, rng) for sample in pool]
            if self.window > 1:
                groups = length_buckets([p.cost for p in prepared], self.batch_size)
                rng.shuffle(groups)
            else:
                groups = cut(list(range(len(prepared))), self.batch_size)
            tokens_per_batch = sum(len(p.target_ids) for p in prepared) / len(groups)
            for j in range(start.emitted, len(groups)):
                self.state = BatcherState(start.epoch, start.index, start.pool, j + 1)
                mine = groups[j][self.rank * self.per_process: (self.rank + 1) * self.per_process]
                batch = pad([prepared[i] for i in mine], self.collator.t5_tokenizer.pad_token_id, self.pin_memory,
                            decoders)
                batch.loss_tokens = tokens_per_batch / self.world
                yield batch
            self.state = BatcherState(stream.position.epoch, stream.position.index, start.pool + 1, 0)


def length_buckets(costs: list[tuple[int, int]], size: int) -> list[list[int]]:
    """Indices of `costs` ((target, source) lengths, `Prepared.cost`) cut into groups of `size`
    (the last may be short) that pad little: sorted by target length, the only padding a step still
    computes on (source rows are packed; padded source slots only widen attention, under 1% of a
    step's FLOPs). At flan-t5-xxl shapes, lengths uniform in 1..128 and 8..128 and a pool of 64
    groups of 32, this spends about 1.5% of a step's FLOPs on padding (`benchmarks/train_step.py`'s
    padding column)."""
    return cut(sorted(range(len(costs)), key=costs.__getitem__), size)


def cut(order: list[int], size: int) -> list[list[int]]:
    """`order` in consecutive groups of `size` (the last may be short)."""
    return [order[k: k + size] for k in range(0, len(order), size)]


def take(stream: Iterator[Sample], n: int) -> list[Sample]:
    return [next(stream) for _ in range(n)]


@contextmanager
def prefetched(batcher: Batcher, *, depth: int,
               device: torch.device | None = None) -> Iterator[Iterator[tuple[Batch, BatcherState]]]:
    """`batcher`'s batches, made up to `depth` ahead on a background thread, each with the batcher
    state after it (what a checkpoint taken after training on it must store).

    Reading, decoding, splitting, tokenizing and padding then overlap the GPU's work on earlier
    batches instead of stalling it. `depth` should cover a bucketing pool (`window` batches): the
    batcher reads and splits a pool's samples all at once. The thread starts at the first request;
    an error in it is raised by the consumer; leaving the context stops it. `device`: the thread's
    CUDA device, so the pinned memory it makes belongs to this process's GPU (otherwise GPU 0,
    where every process would also open a CUDA context).
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            for batch in batcher:
                state = BatcherState(**batcher.state.__dict__)
                if not offer((batch, state)):
                    return
        except BaseException as error:  # noqa: BLE001  handed to the consumer, raised there
            offer(error)

    thread = threading.Thread(target=produce, name="batches", daemon=True)

    def consume() -> Iterator[tuple[Batch, BatcherState]]:
        thread.start()  # on the first request: a run that is already complete reads nothing
        while True:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    try:
        yield consume()
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
