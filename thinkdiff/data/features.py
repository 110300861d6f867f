"""The feature store: Parquet shards of generated captions and their VLM token states.

One row per image, keyed by the corpus `key`:

| column      | type              | meaning                                                    |
|-------------|-------------------|------------------------------------------------------------|
| key         | string            | join key from the corpus                                   |
| instruction | string            | the user instruction the VLM answered                      |
| text        | string            | the generated caption (special tokens removed)             |
| token_ids   | list<int32>       | all generated ids, EOS included when one was generated     |
| num_tokens  | int32             | len(token_ids)                                             |
| num_rows    | int32             | stored feature rows = min(num_tokens, max_feature_rows)    |
| features    | large_binary      | num_rows x dim raw values of `dtype`, row-major            |

The file metadata (`thinkdiff.*` keys) records schema version, feature kind, dtype, dim, model id
and revision, max_feature_rows and the images that failed to decode. Features are raw bytes in a
binary column, uncompressed: read zero-copy this outruns any GPU consumer (docs/performance.md).

A store directory holds `part-{corpus shard}.parquet` files, each written under a temporary name
and renamed when complete, and `manifest.json`, written last. `FeatureStore(dir).as_dataset()` opens
it as a Hugging Face `datasets.Dataset` (browse, filter, `push_to_hub`) without writing a copy.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from thinkdiff.config import fingerprint
from thinkdiff.errors import DataContractError
from thinkdiff.storage import (
    FEATURES_SCHEMA_VERSION,
    flush_to_disk,
    read_manifest,
    readable_parquet,
    stop_when_full,
    temp_path_for,
)

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

FEATURE_KIND_LVLM = "lvlm-generated-final-norm"
FEATURE_KIND_CLIP = "clip-vision-cls-grid"
_META_PREFIX = "thinkdiff."
# Stored as raw bits of this width; torch reinterprets them as the feature dtype.
_BITS = {"bfloat16": (torch.int16, np.int16), "float16": (torch.int16, np.int16), "float32": (torch.int32, np.int32)}
_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

ARROW_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("instruction", pa.string()),
    ("text", pa.string()),
    ("token_ids", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()),
    ("num_rows", pa.int32()),
    ("features", pa.large_binary()),
])


@dataclass(frozen=True, kw_only=True)
class FeatureStoreInfo:
    """What every shard of one store has in common; written to each file's metadata."""

    schema_version: int
    feature_kind: str
    dtype: str
    dim: int
    model_id: str
    model_revision: str
    max_feature_rows: int

    def to_metadata(self) -> dict[bytes, bytes]:
        return {f"{_META_PREFIX}{k}".encode(): json.dumps(v).encode() for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, path: Path, metadata: dict[bytes, bytes] | None) -> FeatureStoreInfo:
        meta = {k.decode(): v for k, v in (metadata or {}).items()}
        values = {}
        for name in cls.__dataclass_fields__:
            raw = meta.get(f"{_META_PREFIX}{name}")
            if raw is None:
                raise DataContractError(f"{path}: not a thinkdiff feature shard "
                                        f"(metadata key {_META_PREFIX}{name} missing)")
            values[name] = json.loads(raw)
        return cls(**values)


@dataclass
class FeatureRecord:
    key: str
    instruction: str
    text: str
    token_ids: list[int]
    features_LD: torch.Tensor
    """Producing states of the generated tokens; only the first max_feature_rows are stored."""


FLOAT8 = "float8_e4m3"
_FLOAT8_MAX = 448.0  # largest finite float8_e4m3fn


def encode_features(features_LD: torch.Tensor, dtype: str) -> bytes:
    """Raw row-major values; `float8_e4m3` stores a float32 scale per row, then 1 byte per value."""
    rows = features_LD.detach().to("cpu", torch.float32).contiguous()
    if dtype == FLOAT8:
        scale_L1 = (rows.abs().amax(dim=1, keepdim=True) / _FLOAT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        quantized = (rows / scale_L1).to(torch.float8_e4m3fn).view(torch.uint8)
        return scale_L1.numpy().tobytes() + quantized.numpy().tobytes()
    bits, _ = _BITS[dtype]
    return rows.to(_TORCH[dtype]).view(bits).numpy().tobytes()


# float8_e4m3fn bit pattern -> float32 value: decoding through this table is about 2.5x faster
# than torch's float8 -> float32 cast on a CPU, and gives the same values.
_FLOAT8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def decoded_dtype(dtype: str) -> torch.dtype:
    """What a storage dtype decodes to: itself, or float32 for `float8_e4m3` (values times a row scale)."""
    return torch.float32 if dtype == FLOAT8 else _TORCH[dtype]


def decode_features(data: bytes | memoryview | np.ndarray, num_rows: int, dim: int, dtype: str, *,
                    rows: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bytes of one sample -> its first `rows` rows (default: all), (rows, dim) of `decoded_dtype`.

    `out`: a contiguous (rows, dim) CPU tensor of that dtype (a sample's block of a batch) to decode
    into, so each value is written once.
    """
    rows = num_rows if rows is None else rows
    if not 0 <= rows <= num_rows:
        raise ValueError(f"asked for {rows} feature rows of a sample that stores {num_rows}")
    if out is not None and tuple(out.shape) != (rows, dim):
        raise ValueError(f"cannot decode {rows} x {dim} feature rows into a tensor of shape {tuple(out.shape)}")
    out = torch.empty(rows, dim, dtype=decoded_dtype(dtype)) if out is None else out
    if dtype == FLOAT8:
        scale = np.frombuffer(data, dtype=np.float32, count=rows).reshape(rows, 1)
        values = np.frombuffer(data, dtype=np.uint8, count=rows * dim, offset=4 * num_rows).reshape(rows, dim)
        target = out.numpy()
        np.take(_FLOAT8_VALUES, values, out=target, mode="clip")  # "clip": no buffering (a byte is always in range)
        np.multiply(target, scale, out=target)
    else:
        bits, np_bits = _BITS[dtype]
        np.copyto(out.view(bits).numpy(), np.frombuffer(data, dtype=np_bits, count=rows * dim).reshape(rows, dim))
    return out


@dataclass(frozen=True, eq=False)  # compared by identity: the bytes are an array
class StoredFeatures:
    """One sample's features as the store holds them (a zero-copy view of its row group's bytes),
    decoded on demand: training decodes only the source rows a split keeps, and each process only
    the samples of its own slice of a batch."""

    data: np.ndarray
    num_rows: int
    dim: int
    dtype: str

    @classmethod
    def encode(cls, features_LD: torch.Tensor, dtype: str = "float32") -> StoredFeatures:
        """Features as the store would hold them in `dtype`."""
        return cls(np.frombuffer(encode_features(features_LD, dtype), np.uint8), *features_LD.shape, dtype)

    def decode(self, rows: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return decode_features(self.data, self.num_rows, self.dim, self.dtype, rows=rows, out=out)


def binary_values(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Every value of a large_binary column as a zero-copy uint8 view into the column's buffers:
    about 1 us per value, where a pyarrow scalar per value costs about 100 us (900 KB values)."""
    if not pa.types.is_large_binary(column.type):
        raise DataContractError(f"the features column is {column.type}, expected large_binary (ARROW_SCHEMA); "
                                "re-extract the features")
    views: list[np.ndarray] = []
    for chunk in column.chunks:
        _, offsets_buffer, data_buffer = chunk.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[chunk.offset: chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.empty(0, np.uint8)
        views.extend(data[offsets[i]: offsets[i + 1]] for i in range(len(chunk)))
    return views


KEPT_SHARDS = "the feature shards completed before it are kept, and the stage resumes at the first missing one"


def write_feature_shard(
    path: Path, records: Sequence[FeatureRecord], info: FeatureStoreInfo, failures: Sequence[dict] = ()
) -> Path:
    """Write one shard atomically; `failures` ({key, error}) go into the file metadata.

    Raises:
        FileExistsError: the shard exists (completed shards are never overwritten).
        ValueError: a record's feature width differs from `info.dim`.
        DiskFullError: the disk ran out of space; no part of the shard is left behind.
    """
    if path.exists():
        raise FileExistsError(f"{path} exists; completed feature shards are never overwritten")
    columns: dict[str, list] = {name: [] for name in ARROW_SCHEMA.names}
    for rec in records:
        if rec.features_LD.ndim != 2 or rec.features_LD.shape[1] != info.dim:
            raise ValueError(f"{path}: record {rec.key} has features of shape {tuple(rec.features_LD.shape)}, "
                             f"expected (L, {info.dim})")
        rows = rec.features_LD[: info.max_feature_rows]
        columns["key"].append(rec.key)
        columns["instruction"].append(rec.instruction)
        columns["text"].append(rec.text)
        columns["token_ids"].append(rec.token_ids)
        columns["num_tokens"].append(len(rec.token_ids))
        columns["num_rows"].append(rows.shape[0])
        columns["features"].append(encode_features(rows, info.dtype))
    metadata = {**info.to_metadata(), f"{_META_PREFIX}failures".encode(): json.dumps(list(failures)).encode()}
    table = pa.table(columns, schema=ARROW_SCHEMA.with_metadata(metadata))
    with stop_when_full(path.parent, KEPT_SHARDS):
        tmp = temp_path_for(path)
        try:
            # Small row groups keep the streaming reader's memory bounded and let it skip groups on resume.
            pq.write_table(table, tmp, compression="none", row_group_size=64, use_dictionary=["key", "instruction"])
            flush_to_disk(tmp)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


REEXTRACT = ("delete it and the store's manifest.json (if there is one), then run the same `thinkdiff features` "
             "command again: it extracts that shard again and keeps the others")


def read_shard_info(path: Path) -> FeatureStoreInfo:
    with readable_parquet(path, REEXTRACT):
        return FeatureStoreInfo.from_metadata(path, pq.read_schema(path).metadata)


def read_shard_failures(path: Path) -> list[dict]:
    with readable_parquet(path, REEXTRACT):
        meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(f"{_META_PREFIX}failures".encode(), b"[]"))


class FeatureStore:
    """A completed feature-store directory, read shard by shard and column by column.

    Every shard's metadata is checked against the manifest's (and the caller's `expect`) when the
    store is opened, so a store mixing models, dims or schema versions is rejected up front.
    """

    def __init__(self, directory: str | Path, *, expect_model_id: str | None = None, expect_dim: int | None = None):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"feature store {self.directory}: no such directory; run `thinkdiff features` "
                                    "with the same --config and overrides, or pass the directory it printed with "
                                    "--features")
        manifest = read_manifest(self.directory, "features")
        if manifest is None:
            raise FileNotFoundError(
                f"{self.directory}/manifest.json not found: the feature store is incomplete; run `thinkdiff features` "
                "with the same --config and overrides (it resumes where it stopped)"
            )
        self.manifest = manifest
        try:
            self.info = FeatureStoreInfo(**manifest["info"])
            listed = [(self.directory / s["name"], s["num_samples"]) for s in manifest["shards"]]
        except (KeyError, TypeError) as err:
            raise DataContractError(f"{self.directory}/manifest.json is not a feature-store manifest "
                                    f"({type(err).__name__}: {err}); delete it and run `thinkdiff features` again "
                                    "(it finds the shards done)") from None
        if self.info.schema_version != FEATURES_SCHEMA_VERSION:
            raise DataContractError(
                f"{self.directory}/manifest.json: schema version {self.info.schema_version}, this code reads "
                f"{FEATURES_SCHEMA_VERSION}; re-extract the features"
            )
        self.shards = [shard for shard, _ in listed]
        for shard in self.shards:
            self._check_shard(shard, expect_model_id, expect_dim)
        self.num_samples = sum(n for _, n in listed)

    def _check_shard(self, path: Path, expect_model_id: str | None, expect_dim: int | None) -> None:
        if not path.is_file():
            raise DataContractError(f"{path} is listed in {self.directory}/manifest.json but missing")
        info = read_shard_info(path)
        mismatches = [
            f"{name}: shard has {getattr(info, name)!r}, store has {getattr(self.info, name)!r}"
            for name in FeatureStoreInfo.__dataclass_fields__
            if getattr(info, name) != getattr(self.info, name)
        ]
        if info.schema_version != FEATURES_SCHEMA_VERSION:
            mismatches.append(f"schema_version: shard has {info.schema_version}, "
                              f"this code reads {FEATURES_SCHEMA_VERSION}")
        if expect_model_id is not None and info.model_id != expect_model_id:
            mismatches.append(f"model_id: shard has {info.model_id!r}, config models.vlm.id is {expect_model_id!r}")
        if expect_dim is not None and info.dim != expect_dim:
            mismatches.append(f"dim: shard has {info.dim}, expected {expect_dim}")
        if mismatches:
            raise DataContractError(f"{path}: does not match: " + "; ".join(mismatches)
                                    + ". Re-extract it or point to the right store.")

    @functools.cached_property
    def units(self) -> list[tuple[Path, int, int]]:
        """(shard, row group index, rows) for every row group: the units the training stream shuffles
        (read from the Parquet footers once per store)."""
        units = []
        for shard in self.shards:
            with readable_parquet(shard, REEXTRACT):
                meta = pq.ParquetFile(shard).metadata
            units.extend((shard, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups))
        return units

    def read_row_group(self, shard: Path, index: int, columns: Sequence[str]) -> pa.Table:
        with readable_parquet(shard, REEXTRACT):
            return pq.ParquetFile(shard, memory_map=True).read_row_group(index, columns=list(columns))

    def iter_records(self, columns: Sequence[str] = ("key", "text")) -> Iterator[dict]:
        """Stream rows as dicts of the chosen columns (never more than one batch in memory)."""
        for shard in self.shards:
            for batch in pq.ParquetFile(shard, memory_map=True).iter_batches(columns=list(columns), batch_size=256):
                yield from batch.to_pylist()

    def as_dataset(self, columns: Sequence[str] | None = None) -> datasets.Dataset:
        """The store as a Hugging Face `datasets.Dataset`, for browsing, filtering and `push_to_hub`:

            ds = FeatureStore(path).as_dataset()
            ds.filter(lambda row: row["num_tokens"] > 20).push_to_hub("me/thinkdiff-features")

        One row per sample, shards in the manifest's order, with the columns of ARROW_SCHEMA (or
        `columns`, in that order); `features` holds each sample's raw bytes (`StoredFeatures(
        np.frombuffer(row["features"], np.uint8), row["num_rows"], store.info.dim, store.info.dtype)
        .decode()`). `ds.info.description` names the store and holds its info (dtype, dim, model).

        What is and is not copied: nothing is written. There is no Arrow cache file, under the store
        or `HF_DATASETS_CACHE` (which `Dataset.from_parquet` would write), and `filter` and `map`
        keep their results in memory too, unless given a cache file name. Each shard is read from
        its memory-mapped file into Arrow arrays in this process's memory (Parquet pages are decoded,
        not mapped as they are), the shards' tables are joined without copying, and the Dataset wraps
        those arrays as they are. The memory needed is the size of the columns read: leave out
        `features` to browse a store larger than memory.

        Raises:
            ImportError: `datasets` is not installed (`pip install -e '.[data]'`).
            ValueError: a column that the store does not have.
            DataContractError: a shard is not a readable Parquet file.
        """
        try:
            import datasets
        except ImportError:
            raise ImportError("FeatureStore.as_dataset needs the `datasets` package: "
                              "pip install -e '.[data]'") from None
        names = list(ARROW_SCHEMA.names if columns is None else columns)
        unknown = [name for name in names if name not in ARROW_SCHEMA.names]
        if unknown or not names:
            raise ValueError(f"columns={list(columns or [])}: a feature store has the columns {ARROW_SCHEMA.names}")
        tables = []
        for shard in self.shards:
            with readable_parquet(shard, REEXTRACT):
                tables.append(pq.read_table(shard, columns=names, memory_map=True).replace_schema_metadata(None))
        schema = pa.schema([ARROW_SCHEMA.field(name) for name in names])
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        # Named by the store's fingerprint and the columns; `datasets` names what it derives from it after that.
        store = self.manifest.get("fingerprint") or str(self.directory.resolve())
        description = f"ThinkDiff feature store {self.directory}: {json.dumps(asdict(self.info))}"
        info = datasets.DatasetInfo(description=description)
        return datasets.Dataset(table, info=info, fingerprint=fingerprint({"store": store, "columns": names}))
