"""Covers: url lists are checked before any download (missing columns, empty, unreadable, missing
file); the demo corpus goes through loopback HTTP + img2dataset with its broken urls counted per
shard; a user's url list (LAION-style parquet columns) downloads; the stage fails below the
success rate naming shards and error kinds, and a rerun (with a lower bar) finishes from the shards
already done; the fingerprint leaves out how the corpus is downloaded; a killed stage (SIGKILL, SIGTERM)
leaves no img2dataset process, and a rerun downloads again the shards it cannot trust (finished after
their parent died, or disagreeing with their stats); a damaged shard or a binary url list is named in
one line with the fix."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkdiff import pipeline
from thinkdiff.config import load_config
from thinkdiff.data.corpus import (
    CorpusError,
    IncompleteDownloadError,
    build_corpus,
    check_shard_stats,
    check_url_list,
    corpus_shards,
    read_corpus_shard,
    render_demo_image,
)
from thinkdiff.data.webserver import serve_directory
from thinkdiff.errors import DataContractError
from thinkdiff.storage import corpus_fingerprint, stage_dir


def test_missing_columns_named_with_fix(tmp_path):
    path = tmp_path / "urls.tsv"
    path.write_text("link\ttext\nhttp://x/a.jpg\ta\n")
    with pytest.raises(CorpusError, match=r"column\(s\) \['url', 'caption'\] not found; "
                                          r"its columns are \['link', 'text'\]. Set corpus.url_col"):
        check_url_list(path, "tsv", "url", "caption")


def test_empty_and_unreadable_and_missing_lists(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("url,caption\n")
    with pytest.raises(CorpusError, match="has no rows"):
        check_url_list(empty, "csv", "url", "caption")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(CorpusError, match=r"broken.parquet: cannot be read as parquet"):
        check_url_list(broken, "parquet", "URL", "TEXT")
    with pytest.raises(CorpusError, match="no such file"):
        check_url_list(tmp_path / "nope.tsv", "tsv", "url", "caption")
    with pytest.raises(CorpusError, match="corpus.input_format='txt'"):
        check_url_list(empty, "txt", "url", "caption")
    with pytest.raises(IsADirectoryError,
                       match=rf"corpus.url_list='{tmp_path}' is a directory: give the url list file in it"):
        corpus_fingerprint(load_config("tiny", [f"corpus.url_list={tmp_path}", "corpus.input_format=tsv"]))


def test_parquet_list_rows_counted(tmp_path):
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"URL": ["http://a", "http://b"], "TEXT": ["a", "b"], "similarity": [0.3, 0.4]}), path)
    assert check_url_list(path, "parquet", "URL", "TEXT") == 2


def test_demo_corpus_counts_broken_urls_per_shard(demo_corpus):
    cfg, corpus_dir = demo_corpus
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert (manifest["count"], manifest["successes"]) == (43, 40)
    assert [s["count"] for s in manifest["shards"]] == [16, 16, 11]
    assert sum(s["failed_to_download"] for s in manifest["shards"]) == 2
    assert sum(s["failed_to_resize"] for s in manifest["shards"]) == 1
    assert any("404" in kind for kind in manifest["errors"])
    rows = pq.read_table(corpus_dir / "00000.parquet", columns=["key", "caption", "status"]).to_pylist()
    captions = [r["caption"] for r in rows if r["status"] == "success"]
    assert all(c.startswith("a ") and c.endswith(" background") for c in captions)
    images = list(read_corpus_shard(corpus_dir / "00000.parquet"))
    assert len(images) == sum(r["status"] == "success" for r in rows)
    assert images[0].image.size == (cfg.corpus.image_size, cfg.corpus.image_size)


def test_user_url_list_with_failures_then_resume(make_cfg, tmp_path, caplog):
    site = tmp_path / "site"
    site.mkdir()
    for i in range(6):
        render_demo_image("circle", "red", "blue", "large", 64).save(site / f"{i}.jpg")
    (site / "bad.jpg").write_bytes(b"\x00\x01 not an image")
    cfg = make_cfg("corpus.input_format=parquet", "corpus.url_col=URL", "corpus.caption_col=TEXT",
                   "corpus.shard_size=3", "corpus.min_success_rate=0.9").corpus
    out = tmp_path / "corpus"
    with serve_directory(site) as base:
        urls = [f"{base}/{i}.jpg" for i in range(6)] + [f"{base}/missing.jpg", f"{base}/bad.jpg", "http://127.0.0.1:9/refused.jpg"]
        url_list = tmp_path / "laion.parquet"
        pq.write_table(pa.table({"URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))]}), url_list)
        cfg.url_list = str(url_list)
        with pytest.raises(CorpusError) as err, caplog.at_level(logging.INFO, logger="thinkdiff.data.corpus"):
            build_corpus(cfg, out)
        # Progress from the shards' stats files as img2dataset writes them: the last line says all 3.
        progress = [r.getMessage() for r in caplog.records if "shards downloaded" in r.getMessage()]
        assert progress and progress[-1].startswith("corpus: 3/3 shards downloaded") and "ETA 0s" in progress[-1]
        message = str(err.value)
        assert "6/9 images downloaded (66.7% < corpus.min_success_rate=90%)" in message
        assert "00002.parquet 0/3" in message and "404" in message and "Image decoding error" in message
        assert "run the stage again with a lower corpus.min_success_rate" in message
        assert not (out / "manifest.json").exists()
        # A lower bar accepts the same shards without downloading them again.
        stamp = (out / "00000_stats.json").stat().st_mtime_ns
        cfg.min_success_rate = 0.5
        build_corpus(cfg, out)
    assert (out / "00000_stats.json").stat().st_mtime_ns == stamp
    # The bar is not in the fingerprint: a config with a higher one refuses the corpus accepted under 0.5.
    cfg.min_success_rate = 0.9
    with pytest.raises(CorpusError, match=r"accepted with 66.7% of its images downloaded, "
                                          r"below this config's corpus.min_success_rate=90%"):
        build_corpus(cfg, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["successes"] == 6 and manifest["shards"][2]["failed_to_download"] == 2
    captions = pq.read_table(out / "00001.parquet", columns=["caption"]).column("caption").to_pylist()
    assert sorted(captions) == ["caption 3", "caption 4", "caption 5"]  # rows land in completion order


def test_the_corpus_fingerprint_covers_what_is_downloaded_not_how(make_cfg, tmp_path):
    """A rerun with more download threads, or with a lower success bar after a failed check, finds
    the shards already downloaded; the demo generator's settings do not touch a real url list."""
    urls = tmp_path / "urls.tsv"
    urls.write_text("url\tcaption\nhttp://127.0.0.1:9/a.jpg\ta\n")
    real = (f"corpus.url_list={urls}", "corpus.input_format=tsv")
    base = corpus_fingerprint(make_cfg(*real))
    for how in ("corpus.min_success_rate=0.5", "corpus.processes=7", "corpus.threads=3", "corpus.demo_images=5",
                "corpus.seed=9"):
        assert corpus_fingerprint(make_cfg(*real, how)) == base, how
    for what in ("corpus.image_size=64", "corpus.shard_size=7", "corpus.resize_mode=keep_ratio"):
        assert corpus_fingerprint(make_cfg(*real, what)) != base, what
    urls.write_text("url\tcaption\nhttp://127.0.0.1:9/b.jpg\tb\n")
    assert corpus_fingerprint(make_cfg(*real)) != base
    demo = corpus_fingerprint(make_cfg())
    assert corpus_fingerprint(make_cfg("corpus.threads=3")) == demo != corpus_fingerprint(
        make_cfg("corpus.demo_images=5"))


def test_a_damaged_corpus_shard_is_named_with_the_fix(demo_corpus, tmp_path):
    _, corpus_dir = demo_corpus
    data = (Path(corpus_dir) / "00000.parquet").read_bytes()
    for name, cut in (("00000.parquet", data[:100]), ("00001.parquet", data[:4] + bytes(len(data) - 8) + data[-4:])):
        (tmp_path / name).write_bytes(cut)
        with pytest.raises(DataContractError, match=rf"{tmp_path / name} is not a readable Parquet file .*: delete it, "
                                                    rf"{name[:5]}_stats.json and the directory's manifest.json"):
            list(read_corpus_shard(tmp_path / name))


def test_a_damaged_stats_file_is_named_with_the_fix(demo_corpus, tmp_path):
    cfg, corpus_dir = demo_corpus
    copy = shutil.copytree(corpus_dir, tmp_path / "corpus")
    (copy / "00001_stats.json").write_text('{"count": 16,')
    with pytest.raises(DataContractError,
                       match=r"00001_stats.json is not valid JSON .*: delete it and its shard 00001.parquet"):
        check_shard_stats(copy, 43, cfg.corpus)


def test_features_refuse_the_configs_corpus_until_its_stage_completed(make_cfg, demo_corpus, tmp_path):
    """A download that stopped or failed `corpus.min_success_rate` leaves shards and stats but no
    manifest: the features stage must not caption it as if it had passed. A directory given by hand
    (any img2dataset output) is read from its stats files. A completed corpus must clear the reading
    config's bar."""
    cfg = make_cfg()
    own = stage_dir(cfg, "corpus")
    own.mkdir(parents=True)
    (own / "00000_stats.json").write_text(json.dumps({"count": 4, "successes": 0}))
    # also named by hand
    for given in (None, tmp_path / ".." / tmp_path.name / "data" / own.relative_to(tmp_path / "data")):
        with pytest.raises(FileNotFoundError, match=r"the corpus at .* has not completed .* "
                                                    r"run `thinkdiff corpus` with the same --config"):
            pipeline.cache_features(cfg, corpus_dir=given)
    _, corpus_dir = demo_corpus
    external = tmp_path / "img2dataset-out"
    external.mkdir()
    for f in Path(corpus_dir).glob("00000*"):
        (external / f.name).write_bytes(f.read_bytes())
    assert pipeline.pending_feature_shards(cfg, external) == [external / "00000.parquet"]
    # A completed corpus (40 of 43 images) is refused by a config with a higher bar than it passed.
    with pytest.raises(CorpusError, match=r"accepted with 93.0% of its images downloaded, "
                                          r"below this config's corpus.min_success_rate=99%"):
        pipeline.pending_feature_shards(make_cfg("corpus.min_success_rate=0.99"), corpus_dir)


class _HangingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        time.sleep(60)  # a server that never answers in time: img2dataset stays busy

    def log_message(self, *args):
        pass


def _process_table() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (parent pid, state, command line) of every process still running (zombies left out)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if fields[0] != "Z":
            table[int(stat.parent.name)] = (int(fields[1]), fields[0], cmdline)
    return table


def _family(root: int, table: dict[int, tuple[int, str, bytes]]) -> set[int]:
    family, grew = {root} & table.keys(), True
    while grew:
        more = {pid for pid, (ppid, _, _) in table.items() if ppid in family} - family
        family |= more
        grew = bool(more)
    return family


@contextlib.contextmanager
def _download_that_hangs(tmp_path, *, watched: bool):
    """A corpus stage in a subprocess downloading from a loopback server that never answers; yields
    (runner, output directory, the running img2dataset family's pids). `watched`: the family is the
    supervisor, img2dataset and at least one worker of its pool (a child of the runner); else
    img2dataset and one worker. Whatever is left is killed afterwards. The runner logs what it does
    and prints its threads' stacks on SIGUSR1: a hang shows where it is."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HangingHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    urls = tmp_path / "urls.tsv"
    urls.write_text("url\tcaption\n"
                    + "".join(f"http://127.0.0.1:{server.server_port}/{i}.jpg\tslow {i}\n" for i in range(8)))
    out = tmp_path / "corpus-being-downloaded"
    script = ("import faulthandler, logging, signal\nfrom pathlib import Path\n"
              "from thinkdiff.config import load_config\n"
              "from thinkdiff.data.corpus import build_corpus\n"
              "faulthandler.register(signal.SIGUSR1)\nlogging.basicConfig(level=logging.INFO)\n"
              # Ctrl-C as in a terminal, also where this test runs in the background (whose SIGINT is ignored).
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              f"cfg = load_config('tiny', ['corpus.url_list={urls}', 'corpus.timeout_s=60'])\n"
              f"build_corpus(cfg.corpus, Path('{out}'))\n")
    runner = subprocess.Popen([sys.executable, "-c", script])
    family: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        while len(family) < (3 if watched else 2):
            assert time.monotonic() < deadline and runner.poll() is None, "img2dataset never started its workers"
            time.sleep(0.2)
            table = _process_table()
            started = [pid for pid, (ppid, _, cmd) in table.items()
                       if str(out).encode() in cmd and pid != runner.pid and (ppid == runner.pid or not watched)]
            family = _family(started[0], table) if started else set()
        yield runner, out, family
    finally:
        runner.kill()
        for pid in family & _process_table().keys():  # not left behind for the rest of the run
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.shutdown()


def test_an_interrupted_download_leaves_no_img2dataset_process(tmp_path):
    """Ctrl-C (or a Prefect cancellation) during img2dataset stops it and its worker pool."""
    with _download_that_hangs(tmp_path, watched=False) as (runner, _, family):
        runner.send_signal(signal.SIGINT)
        try:
            assert runner.wait(timeout=60) != 0
        except subprocess.TimeoutExpired:
            runner.send_signal(signal.SIGUSR1)
            time.sleep(2)
            pytest.fail("the interrupted download did not stop within 60 s; its stacks are in the captured stderr")
        assert family & _process_table().keys() == set()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_corpus_stage_leaves_no_img2dataset_process(tmp_path, sig):
    """docker stop, systemd or a Prefect cancellation kill `thinkdiff corpus` without a Python exception:
    img2dataset and its worker pool end with it (they would otherwise download on, and write stats for
    shards whose urls they could no longer reach), and the marker it leaves makes a rerun distrust them."""
    with _download_that_hangs(tmp_path, watched=True) as (runner, out, family):
        assert (out / ".img2dataset-running").is_file()
        runner.send_signal(sig)
        assert runner.wait(timeout=10) == -sig
        deadline = time.monotonic() + 15
        while family & _process_table().keys() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert family & _process_table().keys() == set(), "img2dataset outlived the corpus stage"
        assert (out / ".img2dataset-running").is_file()  # no one saw img2dataset end


def test_a_rerun_downloads_again_the_shards_it_cannot_trust(demo_corpus, tmp_path, caplog):
    """Shards finished after the marker's last renewal (by an orphan of a killed stage), or that disagree
    with their stats (a cut-off Parquet file), are downloaded again; the others are kept."""
    cfg, corpus_dir = demo_corpus
    out = tmp_path / "corpus"
    shutil.copytree(corpus_dir, out)
    (out / "manifest.json").unlink()
    stamps = {f.name: f.stat().st_mtime_ns for f in out.glob("*_stats.json")}
    marker = out / ".img2dataset-running"
    marker.write_text('{"pid": 1}')
    watched = min(stamps.values()) - 10**9
    os.utime(marker, ns=(watched, watched))
    for name in ("00000_stats.json", "00001_stats.json"):  # finished while their parent watched
        os.utime(out / name, ns=(watched - 1, watched - 1))
    data = (out / "00001.parquet").read_bytes()
    (out / "00001.parquet").write_bytes(data[: len(data) // 2])  # and yet cut off
    with caplog.at_level(logging.WARNING, logger="thinkdiff.data.corpus"):
        build_corpus(cfg.corpus, out)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("00001.parquet is not a readable img2dataset Parquet file" in w for w in warnings), warnings
    assert any("00002.parquet finished after the download that wrote it stopped being watched" in w
               for w in warnings), warnings
    assert (out / "00000_stats.json").stat().st_mtime_ns == watched - 1  # kept, not downloaded again
    assert all((out / name).stat().st_mtime_ns > watched for name in ("00001_stats.json", "00002_stats.json"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["count"], manifest["successes"]) == (43, 40)
    assert not marker.exists()


def test_a_shard_that_disagrees_with_its_stats_is_named_by_the_corpus_check(demo_corpus, tmp_path):
    cfg, corpus_dir = demo_corpus
    copy = shutil.copytree(corpus_dir, tmp_path / "corpus")
    stats = json.loads((copy / "00002_stats.json").read_text())
    (copy / "00002_stats.json").write_text(json.dumps({**stats, "successes": stats["successes"] + 1}))
    with pytest.raises(IncompleteDownloadError, match=rf"{copy / '00002.parquet'}: the shard holds 11 rows, \d+ "
                                                      r"downloaded, where 00002_stats.json counts 11, \d+ downloaded; "
                                                      r"rerun the corpus stage: it downloads that shard again"):
        check_shard_stats(copy, 43, cfg.corpus)
    data = (copy / "00001.parquet").read_bytes()
    (copy / "00001.parquet").write_bytes(data[:100])  # the features stage lists the shards first
    with pytest.raises(DataContractError, match=rf"{copy / '00001.parquet'} is not a readable Parquet file .*: "
                                                r"delete it, 00001_stats.json and the directory's manifest.json"):
        corpus_shards(copy)


def test_a_binary_url_list_is_named_not_echoed(tmp_path):
    binary = tmp_path / "urls.tsv"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    with pytest.raises(CorpusError) as err:
        check_url_list(binary, "tsv", "url", "caption")
    message = str(err.value)
    assert message.startswith(f"{binary} is not a tsv text list (binary data; it starts with b'\\x7fELF")
    assert "set corpus.input_format to its format" in message and message.isprintable()
    parquet = tmp_path / "urls.csv"
    pq.write_table(pa.table({"url": ["http://a"], "caption": ["a"]}), parquet)
    with pytest.raises(CorpusError, match=r"urls.csv is a Parquet file, not a csv text list: "
                                          r"set corpus.input_format=parquet"):
        check_url_list(parquet, "csv", "url", "caption")
    # Text that does not parse: pyarrow quotes the row; its control characters come escaped.
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("url\tcaption\nhttp://a\ta\tb\x1b[2J\n")
    with pytest.raises(CorpusError, match=r"ragged.tsv: cannot be read as tsv \(ArrowInvalid: CSV parse error") as err:
        check_url_list(ragged, "tsv", "url", "caption")
    assert str(err.value).isprintable() and "\\x1b[2J" in str(err.value)
