"""Covers: `corpus.url_list=hf://datasets/...` is parsed (repo, revision, config, split; a local
directory in the Hub's layout stands in for the Hub, offline), fingerprinted without loading the
dataset, read once with `datasets` into a Parquet url list that img2dataset downloads from (loopback
HTTP), and not read again by a rerun; a malformed string, an unknown repo, split or column is named
in one line with the fix. A feature store opens as a `datasets.Dataset` in one call, over the arrays
read from its shards, writing nothing (no Arrow cache), and filters."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from thinkdiff import pipeline
from thinkdiff.data import features as fs
from thinkdiff.data.corpus import (
    Corpus,
    CorpusError,
    HfUrlList,
    build_corpus,
    hf_url_list_path,
    parse_hf_url_list,
    render_demo_image,
    write_hf_url_list,
)
from thinkdiff.data.features import ARROW_SCHEMA, FeatureRecord, FeatureStore, FeatureStoreInfo, write_feature_shard
from thinkdiff.data.webserver import serve_directory
from thinkdiff.storage import FEATURES_SCHEMA_VERSION, corpus_fingerprint, stage_dir, write_manifest

README = """---
configs:
- config_name: unlabeled
  default: true
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: validation
    path: data/validation-*.parquet
- config_name: labeled
  data_files:
  - split: train
    path: data/labeled/train-*.parquet
---
"""


def hub_layout_dataset(root: Path, base_url: str, images: int = 6) -> Path:
    """A dataset directory laid out as on the Hub (conceptual_captions' columns): config `unlabeled`
    (default; `images` urls that resolve and one that 404s in train, one in validation)
    and `labeled` (with a list column)."""
    cc = root / "cc"
    (cc / "data" / "labeled").mkdir(parents=True)
    (cc / "README.md").write_text(README)
    urls = [f"{base_url}/{i}.jpg" for i in range(images)] + [f"{base_url}/missing.jpg"]
    pq.write_table(pa.table({"image_url": urls, "caption": [f"caption {i}" for i in range(len(urls))],
                             "rank": list(range(len(urls)))}), cc / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"image_url": [f"{base_url}/0.jpg"], "caption": ["held out"], "rank": [0]}),
                   cc / "data" / "validation-00000-of-00001.parquet")
    pq.write_table(pa.table({"image_url": urls[:2], "caption": ["a", "b"], "labels": [["x"], ["y", "z"]]}),
                   cc / "data" / "labeled" / "train-00000-of-00001.parquet")
    return cc


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for i in range(6):
        render_demo_image("square", "green", "white", "large", 64).save(site / f"{i}.jpg")
    return site


@pytest.fixture
def no_loading(monkeypatch):
    """Fails any datasets.load_dataset call: what must not read the dataset (again)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"load_dataset{args} was called")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_the_hf_url_list_forms(tmp_path):
    cc = hub_layout_dataset(tmp_path, "http://127.0.0.1:9")
    assert parse_hf_url_list("hf://datasets/google-research-datasets/conceptual_captions") == HfUrlList(
        "google-research-datasets/conceptual_captions", None, "train", None)
    assert parse_hf_url_list("hf://datasets/o/n/labeled:validation") == HfUrlList("o/n", "labeled", "validation", None)
    assert parse_hf_url_list("hf://datasets/o/n.v2@refs%2Fconvert%2Fparquet/unlabeled:train[:1000]") == HfUrlList(
        "o/n.v2", "unlabeled", "train[:1000]", "refs/convert/parquet")
    # A local directory: the last segment names the config unless it is a directory.
    assert parse_hf_url_list(f"hf://datasets/{cc}") == HfUrlList(str(cc), None, "train", None)
    assert parse_hf_url_list(f"hf://datasets/{cc}/labeled:train") == HfUrlList(str(cc), "labeled", "train", None)
    assert parse_hf_url_list(f"hf://datasets/{cc}/data/").path == str(cc / "data")
    for bad in ("hf://datasets/", "hf://datasets/conceptual_captions", "hf://models/o/n", "hf://o/n",
                "hf://datasets/o/n:", "hf://datasets/o/n/c/extra", "hf://datasets/o/n:train validation",
                "hf://datasets/o/n@/c"):
        with pytest.raises(CorpusError) as err:
            parse_hf_url_list(bad)
        message = str(err.value)
        assert message.startswith(f"corpus.url_list={bad!r} is not a Hugging Face dataset: write "
                                  "hf://datasets/<owner>/<name>[@<revision>][/<config>][:<split>]"), bad
        assert "\n" not in message


def test_the_fingerprint_names_the_dataset_without_loading_it(make_cfg, tmp_path, no_loading):
    cc = hub_layout_dataset(tmp_path, "http://127.0.0.1:9")
    hub = "corpus.url_list=hf://datasets/google-research-datasets/conceptual_captions"
    base = corpus_fingerprint(make_cfg(hub))
    # The format setting is not read for a dataset; the demo generator's settings neither.
    assert corpus_fingerprint(make_cfg(hub, "corpus.input_format=parquet", "corpus.seed=3")) == base
    assert corpus_fingerprint(make_cfg(hub + ":train")) != base  # the setting as written is hashed too
    for other in (":validation", "/labeled", "@0123abc"):
        assert corpus_fingerprint(make_cfg(hub + other)) != base, other
    assert corpus_fingerprint(make_cfg(hub, "corpus.url_col=image_url")) != base
    # A local directory's content is hashed: a changed file names another corpus.
    local = make_cfg(f"corpus.url_list=hf://datasets/{cc}")
    before = corpus_fingerprint(local)
    (cc / ".cache").mkdir()  # hidden files (datasets' or git's) are not the dataset's
    (cc / ".cache" / "x").write_text("x")
    assert corpus_fingerprint(local) == before
    pq.write_table(pa.table({"image_url": ["u"], "caption": ["c"], "rank": [0]}),
                   cc / "data" / "validation-00000-of-00001.parquet")
    assert corpus_fingerprint(local) != before
    with pytest.raises(CorpusError, match=r"^corpus.url_list='hf://datasets/x' is not a Hugging Face dataset"):
        stage_dir(make_cfg("corpus.url_list=hf://datasets/x"), "corpus")


def test_a_corpus_from_a_hub_layout_dataset_then_a_rerun_that_does_not_read_it(make_cfg, tmp_path, site,
                                                                                   monkeypatch):
    with serve_directory(site) as base_url:
        cc = hub_layout_dataset(tmp_path, base_url)
        cfg = make_cfg(f"corpus.url_list=hf://datasets/{cc}", "corpus.url_col=image_url", "corpus.shard_size=4",
                       "corpus.min_success_rate=0.8")
        out = pipeline.build_corpus(cfg).path
        assert out == stage_dir(cfg, "corpus")
        url_list = hf_url_list_path(out)
        listed = pq.read_table(url_list)
        assert listed.column_names == ["image_url", "caption"] and listed.num_rows == 7
        assert listed.column("caption").to_pylist() == [f"caption {i}" for i in range(7)]
        manifest = json.loads((out / "manifest.json").read_text())
        assert (manifest["count"], manifest["successes"], len(manifest["shards"])) == (7, 6, 2)
        assert manifest["url_list"] == f"hf://datasets/{cc}" and manifest["errors"]
        assert Corpus(out).shard_success_rates[1]["success rate"] == "66.7%"
        captions = sorted(c for shard in ("00000", "00001") for c, s in zip(
            *pq.read_table(out / f"{shard}.parquet", columns=["caption", "status"]).to_pydict().values(), strict=True)
            if s == "success")
        assert captions == sorted(f"caption {i}" for i in range(6))
        # A rerun of a stage that did not finish reads the url list written then, never the dataset.
        stat = url_list.stat()
        (out / "manifest.json").unlink()
        (out / "00001.parquet").unlink()
        (out / "00001_stats.json").unlink()

        def refuse(*args, **kwargs):
            raise AssertionError("the rerun loaded the dataset")

        monkeypatch.setattr(datasets, "load_dataset", refuse)
        build_corpus(cfg.corpus, out)
    assert json.loads((out / "manifest.json").read_text())["successes"] == 6
    again = url_list.stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, url_list.name])  # no temp files left


def test_a_config_and_split_are_read(make_cfg, tmp_path):
    cc = hub_layout_dataset(tmp_path, "http://127.0.0.1:9")
    cfg = make_cfg(f"corpus.url_list=hf://datasets/{cc}/unlabeled:validation", "corpus.url_col=image_url").corpus
    assert write_hf_url_list(cfg, tmp_path / "v.parquet") == 1
    assert pq.read_table(tmp_path / "v.parquet").column("caption").to_pylist() == ["held out"]
    cfg.url_list = f"hf://datasets/{cc}/labeled"
    assert write_hf_url_list(cfg, tmp_path / "l.parquet") == 2
    cfg.url_list = f"hf://datasets/{cc}:train[2:5]"
    assert write_hf_url_list(cfg, tmp_path / "s.parquet") == 3


@pytest.mark.parametrize(("url_list", "overrides", "expected"), [
    ("{cc}", ("corpus.url_col=url",), r"the dataset has no column\(s\) \['url'\]; its columns are \['image_url', "
                                      r"'caption', 'rank'\]: set corpus.url_col / corpus.caption_col"),
    ("{cc}/labeled", ("corpus.url_col=image_url", "corpus.caption_col=labels"),
     r"column\(s\) labels \(list<item: string>\) are not text: set corpus.url_col / corpus.caption_col"),
    ("{cc}", ("corpus.url_col=rank",), r"column\(s\) rank \(int64\) are not text"),
    ("{cc}:dev", ("corpus.url_col=image_url",), r"cannot load the dataset \(ValueError: Unknown split \"dev\""),
    ("{cc}/nosuchconfig", ("corpus.url_col=image_url",), r"cannot load the dataset \(ValueError: BuilderConfig "
                                                          r"'nosuchconfig' not found"),
    ("{cc}:train[:0]", ("corpus.url_col=image_url",), r"cannot load the dataset \(ValueError: Instruction "
                                                      r"\"train\[:0\]\" corresponds to no data!\)"),
    ("nobody/no-such-dataset", (), r"cannot load the dataset \(ConnectionError: Couldn't reach 'nobody/no-such-"
                                   r"dataset' on the Hub \(OfflineModeIsEnabled\)\); check the repo id, config and "
                                   r"split \(hf://datasets/<owner>/<name>\[@<revision>\]\[/<config>\]\[:<split>\]\)"),
    ("{tmp}/no/where", (), r"cannot load the dataset \(FileNotFoundError: "),
])
def test_an_unusable_dataset_is_named_in_one_line_with_the_fix(make_cfg, tmp_path, url_list, overrides, expected):
    cc = hub_layout_dataset(tmp_path, "http://127.0.0.1:9")
    setting = "hf://datasets/" + url_list.format(cc=cc, tmp=tmp_path)
    cfg = make_cfg(f"corpus.url_list={setting}", *overrides)
    out = stage_dir(cfg, "corpus")
    with pytest.raises(CorpusError) as err:
        pipeline.build_corpus(cfg)
    message = str(err.value)
    assert message.startswith(f"corpus.url_list={setting!r}: ") and "\n" not in message, message
    assert re.search(expected, message), message
    assert not hf_url_list_path(out).exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# A feature store as a datasets.Dataset

INFO = FeatureStoreInfo(schema_version=FEATURES_SCHEMA_VERSION, feature_kind=fs.FEATURE_KIND_LVLM, dtype="bfloat16",
                        dim=6, model_id="tiny", model_revision="tiny-v1", max_feature_rows=4)


def feature_store(directory: Path) -> Path:
    """Two shards of three samples, written by the store's own writer."""
    g = torch.Generator().manual_seed(0)
    entries = []
    for shard in range(2):
        recs = [FeatureRecord(key=f"s{shard}-{i}", instruction="Describe.", text=f"text {shard} {i}",
                              token_ids=list(range(2 + i * 2)), features_LD=torch.randn(2 + i * 2, 6, generator=g))
                for i in range(3)]
        write_feature_shard(directory / f"part-{shard:05d}.parquet", recs, INFO)
        entries.append({"name": f"part-{shard:05d}.parquet", "num_samples": 3, "num_failed": 0})
    write_manifest(directory, {"stage": "features", "fingerprint": "0123456789abcdef",
                               "info": dataclasses.asdict(INFO), "shards": entries})
    return directory


def tree(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_feature_store_opens_as_a_dataset_without_a_copy(tmp_path, monkeypatch):
    store_dir = feature_store(tmp_path / "store")
    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    read: list[pa.Table] = []
    real_read = fs.pq.read_table
    monkeypatch.setattr(fs.pq, "read_table", lambda *a, **k: read.append(real_read(*a, **k)) or read[-1])
    before = tree(store_dir)
    store = FeatureStore(store_dir)

    ds = store.as_dataset()
    assert isinstance(ds, datasets.Dataset) and ds.num_rows == 6 and ds.column_names == ARROW_SCHEMA.names
    assert ds.cache_files == [] and '"dim": 6' in ds.info.description
    # The Dataset's arrays are the ones read from the shards, not copies of them.
    chunks = ds.data.table.column("features").chunks
    assert [c.buffers()[2].address for c in chunks] == [t.column("features").chunk(0).buffers()[2].address
                                                         for t in read]
    rows = [row for shard in store.shards for row in real_read(shard).to_pylist()]
    for i, row in enumerate(rows):
        got = ds[i]
        assert got["key"] == row["key"] and got["token_ids"] == row["token_ids"]
        assert got["features"] == row["features"]
        decoded = fs.StoredFeatures(np.frombuffer(got["features"], np.uint8), got["num_rows"], 6, "bfloat16").decode()
        assert torch.equal(decoded, fs.decode_features(row["features"], row["num_rows"], 6, "bfloat16"))
    long = ds.filter(lambda r: r["num_tokens"] > 4)
    assert long["key"] == ["s0-2", "s1-2"] and long.cache_files == []
    assert ds.map(lambda r: {"n": len(r["features"])})["n"] == [len(r["features"]) for r in rows]
    assert store.as_dataset(["key", "text"]).column_names == ["key", "text"]
    with pytest.raises(ValueError, match=r"columns=\['pixels'\]: a feature store has the columns"):
        store.as_dataset(["pixels"])
    # Nothing was written: not under the store, not in datasets' cache.
    assert tree(store_dir) == before
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()], os.listdir(cache)
