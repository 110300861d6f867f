"""Covers: feature shards round-trip exactly per storage dtype; writes are atomic and never
overwrite; the reader checks every shard against the manifest and the caller, naming the file and
the mismatch; it reads only the columns asked for."""

from __future__ import annotations

import dataclasses
import errno

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from thinkdiff.data import features as fs
from thinkdiff.data.features import (
    FeatureRecord,
    FeatureStore,
    FeatureStoreInfo,
    StoredFeatures,
    binary_values,
    decode_features,
    decoded_dtype,
    write_feature_shard,
)
from thinkdiff.errors import DataContractError, DiskFullError
from thinkdiff.storage import FEATURES_SCHEMA_VERSION, write_manifest

INFO = FeatureStoreInfo(schema_version=FEATURES_SCHEMA_VERSION, feature_kind=fs.FEATURE_KIND_LVLM, dtype="bfloat16",
                        dim=6, model_id="tiny", model_revision="tiny-v1", max_feature_rows=4)


def records(n=3, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [FeatureRecord(key=f"k{i}", instruction="Describe.", text=f"text {i}", token_ids=list(range(2 + i * 2)),
                          features_LD=torch.randn(2 + i * 2, dim, generator=g)) for i in range(n)]


def make_store(directory, shards: dict[str, FeatureStoreInfo], info=INFO):
    entries = []
    for name, shard_info in shards.items():
        write_feature_shard(directory / name, records(dim=shard_info.dim), shard_info)
        entries.append({"name": name, "num_samples": 3, "num_failed": 0})
    write_manifest(directory, {"stage": "features", "info": dataclasses.asdict(info), "shards": entries})
    return directory


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_per_dtype(tmp_path, dtype):
    info = dataclasses.replace(INFO, dtype=dtype)
    recs = records()
    write_feature_shard(tmp_path / "part-0.parquet", recs, info, failures=[{"key": "bad", "error": "x"}])
    table = pq.read_table(tmp_path / "part-0.parquet")
    assert fs.read_shard_info(tmp_path / "part-0.parquet") == info
    assert fs.read_shard_failures(tmp_path / "part-0.parquet") == [{"key": "bad", "error": "x"}]
    for rec, row in zip(recs, table.to_pylist(), strict=True):
        rows = min(len(rec.token_ids), info.max_feature_rows)
        assert (row["key"], row["text"], row["token_ids"], row["num_tokens"], row["num_rows"]) == (
            rec.key, rec.text, rec.token_ids, len(rec.token_ids), rows)
        decoded = decode_features(row["features"], rows, 6, dtype)
        assert decoded.dtype == getattr(torch, dtype)
        assert torch.equal(decoded, rec.features_LD[:rows].to(getattr(torch, dtype)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3", "float32"])
def test_decoding_the_first_rows_into_a_batch(dtype):
    """What training does: only a sample's first rows, written straight into its block of a batch."""
    stored = StoredFeatures.encode(torch.randn(7, 6, generator=torch.Generator().manual_seed(0)), dtype)
    whole = stored.decode()
    assert whole.shape == (7, 6) and whole.dtype == decoded_dtype(dtype)
    assert torch.equal(stored.decode(3), whole[:3])
    batch = torch.full((2, 5, 6), float("nan"), dtype=whole.dtype)
    assert stored.decode(4, out=batch[1, :4]).data_ptr() == batch[1, :4].data_ptr()
    assert torch.equal(batch[1, :4], whole[:4]) and batch[1, 4:].isnan().all() and batch[0].isnan().all()
    with pytest.raises(ValueError, match="asked for 8 feature rows of a sample that stores 7"):
        stored.decode(8)
    with pytest.raises(ValueError, match=r"into a tensor of shape \(2, 6\)"):
        stored.decode(3, out=batch[0, :2])


def test_write_never_overwrites(tmp_path):
    path = write_feature_shard(tmp_path / "p.parquet", records(), INFO)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_feature_shard(path, records(seed=1), INFO)
    assert path.read_bytes() == before


def test_failed_write_leaves_nothing_visible(tmp_path, monkeypatch):
    def crash(table, where, **kwargs):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(fs.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        write_feature_shard(tmp_path / "p.parquet", records(), INFO)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_store_and_leaves_no_part_of_the_shard(tmp_path, monkeypatch):
    done = write_feature_shard(tmp_path / "part-0.parquet", records(), INFO)
    before = done.read_bytes()

    def full(table, where, **kwargs):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        # What pyarrow raises when the disk fills: an OSError carrying the errno.
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(fs.pq, "write_table", full)
    with pytest.raises(DiskFullError) as caught:
        write_feature_shard(tmp_path / "part-1.parquet", records(seed=1), INFO)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path}: no space left to write there (No space left on device")
    assert message.endswith("free space there and rerun: the feature shards completed before it are kept, "
                            "and the stage resumes at the first missing one")
    assert [p.name for p in tmp_path.iterdir()] == ["part-0.parquet"] and done.read_bytes() == before
    monkeypatch.undo()
    write_feature_shard(tmp_path / "part-1.parquet", records(seed=1), INFO)  # space freed: it is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-0.parquet", "part-1.parquet"]


def test_wrong_feature_width_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"record k0 has features of shape \(2, 5\), expected \(L, 6\)"):
        write_feature_shard(tmp_path / "p.parquet", records(dim=5), INFO)


def test_reader_accepts_matching_store_and_streams_columns(tmp_path):
    store = FeatureStore(make_store(tmp_path, {"a.parquet": INFO, "b.parquet": INFO}), expect_model_id="tiny",
                         expect_dim=6)
    assert store.num_samples == 6
    assert [r["key"] for r in store.iter_records(("key",))] == ["k0", "k1", "k2"] * 2
    shard, group, rows = store.units[0]
    assert rows == 3
    assert store.read_row_group(shard, group, ["num_rows"]).column_names == ["num_rows"]


def test_reader_rejects_other_model(tmp_path):
    make_store(tmp_path, {"a.parquet": INFO})
    with pytest.raises(DataContractError, match=r"a.parquet: does not match: model_id: shard has 'tiny', "
                                                r"config models.vlm.id is 'Qwen/Qwen2-VL-7B-Instruct'"):
        FeatureStore(tmp_path, expect_model_id="Qwen/Qwen2-VL-7B-Instruct")


def test_reader_rejects_mixed_shards(tmp_path):
    make_store(tmp_path, {"a.parquet": INFO, "b.parquet": dataclasses.replace(INFO, dim=5, model_revision="other")})
    with pytest.raises(DataContractError,
                       match=r"b.parquet: does not match: dim: shard has 5, store has 6; model_revision"):
        FeatureStore(tmp_path)


def test_reader_rejects_other_schema_version(tmp_path):
    old = dataclasses.replace(INFO, schema_version=FEATURES_SCHEMA_VERSION + 1)
    make_store(tmp_path, {"a.parquet": old}, info=INFO)
    with pytest.raises(DataContractError, match=r"a.parquet: does not match: schema_version"):
        FeatureStore(tmp_path)
    make_store(tmp_path / "v", {"a.parquet": old}, info=old)
    with pytest.raises(DataContractError, match=r"manifest.json: schema version .*re-extract"):
        FeatureStore(tmp_path / "v")


def test_reader_rejects_foreign_parquet(tmp_path):
    pq.write_table(
        pq.read_table(write_feature_shard(tmp_path / "x.parquet", records(), INFO)).replace_schema_metadata({}),
        tmp_path / "a.parquet")
    write_manifest(tmp_path, {"stage": "features", "info": dataclasses.asdict(INFO),
                              "shards": [{"name": "a.parquet", "num_samples": 3}]})
    with pytest.raises(DataContractError, match="a.parquet: not a thinkdiff feature shard"):
        FeatureStore(tmp_path)


def test_damaged_shards_and_manifests_are_named_with_the_fix(tmp_path):
    """pyarrow's own errors name no file; a truncated shard, or a manifest missing its fields, must."""
    store = make_store(tmp_path / "cut", {"a.parquet": INFO, "b.parquet": INFO})
    shard = store / "b.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataContractError, match=rf"{shard} is not a readable Parquet file \(.*\): "
                                                r"delete it and the store's manifest.json"):
        FeatureStore(store)
    store = make_store(tmp_path / "manifest", {"a.parquet": INFO})
    write_manifest(store, {"stage": "features", "shards": [{"name": "a.parquet", "num_samples": 3}]})
    with pytest.raises(DataContractError,
                       match=r"manifest.json is not a feature-store manifest \(KeyError: 'info'\); delete it"):
        FeatureStore(store)


def test_incomplete_store_is_a_clear_error(tmp_path):
    write_feature_shard(tmp_path / "a.parquet", records(), INFO)
    with pytest.raises(FileNotFoundError, match="incomplete; run `thinkdiff features`"):
        FeatureStore(tmp_path)


def test_float8_store_is_compact_and_close(tmp_path):
    info = dataclasses.replace(INFO, dtype="float8_e4m3")
    recs = records()
    write_feature_shard(tmp_path / "p.parquet", recs, info)
    for rec, row in zip(recs, pq.read_table(tmp_path / "p.parquet").to_pylist(), strict=True):
        rows = min(len(rec.token_ids), info.max_feature_rows)
        assert len(row["features"]) == rows * 6 + rows * 4  # 1 byte per value + a float32 scale per row
        decoded = decode_features(row["features"], rows, 6, "float8_e4m3")
        original = rec.features_LD[:rows]
        assert ((decoded - original).norm(dim=1) / original.norm(dim=1)).max() < 0.05
        # The decoder's lookup table gives exactly torch's float8 -> float32 cast times the row scale.
        raw = torch.frombuffer(bytearray(row["features"]), dtype=torch.uint8)
        scale = raw[: 4 * rows].view(torch.float32).reshape(rows, 1)
        assert torch.equal(decoded, raw[4 * rows:].view(torch.float8_e4m3fn).float().reshape(rows, 6) * scale)


def test_binary_values_are_the_column_values(tmp_path):
    """The training stream's zero-copy views of the features column hold the stored bytes, across
    row groups and chunks (a table read back from two shards has two chunks)."""
    recs = records()
    write_feature_shard(tmp_path / "a.parquet", recs, INFO)
    write_feature_shard(tmp_path / "b.parquet", recs[::-1], INFO)
    table = pa.concat_tables([pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")])
    column = table.column("features").slice(1)  # a chunk that starts at an offset
    assert column.num_chunks == 2
    assert [bytes(v) for v in binary_values(column)] == column.to_pylist()


def test_a_directory_that_is_not_a_feature_store_is_named(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"feature store .*/nowhere: no such directory; run `thinkdiff features` with the same"):
        FeatureStore(tmp_path / "nowhere")
    # what `train --features <corpus dir>` would read
    write_manifest(tmp_path / "corpus", {"stage": "corpus", "count": 3})
    with pytest.raises(DataContractError,
                       match=r"corpus holds the output of the corpus stage; give the directory of a features"):
        FeatureStore(tmp_path / "corpus")
