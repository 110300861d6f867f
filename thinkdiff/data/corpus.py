"""Corpus stage: a url + caption list -> img2dataset Parquet shards, with per-shard failure stats.

    thinkdiff corpus --config tiny        # the generated demo corpus, served on 127.0.0.1
    thinkdiff corpus --config paper-lvlm corpus.url_list=cc3m.tsv

The url list is checked (readable, the url and caption columns present, not empty) before any
download. img2dataset runs as a subprocess (its console entry point), with every argument that
matters taken from `corpus.*`; it writes `{shard:05d}.parquet` + `{shard:05d}_stats.json` into
the stage directory. Per-image failures (404, refused, corrupt, not an image) are data: they are
counted per shard and reported; the stage fails only when the success rate falls below
`corpus.min_success_rate`, naming the shards and the main error kinds. A shard with its stats file
is complete, so a rerun after a crash only redoes the missing ones (img2dataset incremental mode).

What a rerun trusts. img2dataset runs under `thinkdiff.processes.spawn`, so it and its worker pool
end with this process, however it ends (on Linux). While it runs, this process holds an flock on
`.img2dataset.lock` (inherited by the supervisor, so it stays held until the download's processes
are gone) and keeps a marker, `.img2dataset-running`, whose mtime it renews every poll; it removes
the marker once it has seen img2dataset end. A rerun takes the lock (waiting for a download still
running) and, when it finds a marker, discards every shard whose stats file is newer than the
marker's last renewal: those were finished after their parent stopped watching (by an orphan
downloading from a loopback server that had died with its parent, say), or in its last seconds.
Every remaining shard must also agree with its stats: a readable Parquet file with as many rows
and as many `success` rows as its stats say; one that does not (cut off, torn stats) is discarded
and downloaded again. The manifest is written only after img2dataset exited 0 and every shard
passed these checks, so a download that was interrupted is never accepted as complete.

The `demo` url list is a generated set of coloured shapes whose captions describe them, written
to disk and served by a loopback HTTP server for the duration of the download, a few of its urls
deliberately broken, so the offline preset exercises the real download path.

A url list may also be a Hugging Face dataset: `corpus.url_list=hf://datasets/<owner>/<name>` with
`[@<revision>]`, `[/<config>]` and `[:<split>]` (split `train` by default; see `HfUrlList`). It is
read once with `datasets.load_dataset`, and its `corpus.url_col` and `corpus.caption_col` columns are
written, atomically, as a Parquet url list beside the stage directory, `{stage dir}.urls.parquet`,
which img2dataset reads; a rerun reads that file and never the Hub. The fingerprint of such a list
hashes what names it (repo, config, split, revision), not its content: see `hf_url_list_identity`.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import io
import json
import logging
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from thinkdiff.cluster import driver_address
from thinkdiff.config import ClusterConfig, CorpusConfig
from thinkdiff.data.webserver import serve_directory
from thinkdiff.errors import DataContractError, ThinkDiffError, first_line
from thinkdiff.processes import spawn, stop_process_group
from thinkdiff.storage import (
    CORPUS_SCHEMA_VERSION,
    FILE_MODE,
    atomic_write_bytes,
    file_digest,
    flush_to_disk,
    read_manifest,
    readable_parquet,
    stop_when_full,
    temp_path_for,
    write_manifest,
)

log = logging.getLogger(__name__)

DEMO = "demo"
PROGRESS_POLL_S = 2.0  # how often a running download's finished shards are counted
URL_LIST_FORMATS = ("csv", "csv.gz", "tsv", "tsv.gz", "parquet")
DOWNLOAD_LOCK = ".img2dataset.lock"
DOWNLOAD_MARKER = ".img2dataset-running"  # not *.json: img2dataset takes every *.json in its output for a shard's stats
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.3, "large": 0.7}


class CorpusError(ThinkDiffError):
    """The url list is unusable, or too many downloads failed."""


class IncompleteDownloadError(CorpusError):
    """img2dataset stopped before writing every shard; a rerun continues where it stopped."""


@dataclass
class CorpusImage:
    key: str
    image: Image.Image | None
    """None when the bytes could not be decoded; `error` says why."""
    caption: str = ""
    """The url list's caption (ThinkDiff-CLIP trains on it; the LVLM variant ignores it)."""
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# The demo corpus


def render_demo_image(shape: str, colour: str, background: str, size: str, side: int) -> Image.Image:
    """One coloured shape, centred, on a plain background."""
    image = Image.new("RGB", (side, side), COLOURS[background])
    draw = ImageDraw.Draw(image)
    half = SIZES[size] * side / 2
    c = side / 2
    box = (c - half, c - half, c + half, c + half)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "triangle":
        draw.polygon([(c, c - half), (c + half, c + half), (c - half, c + half)], fill=COLOURS[colour])
    else:
        draw.polygon([(c, c - half), (c + half, c), (c, c + half), (c - half, c)], fill=COLOURS[colour])
    return image


def write_demo_site(cfg: CorpusConfig, site_dir: Path) -> list[tuple[str, str]]:
    """Write the demo images under `site_dir` and return (relative url path, caption) rows.

    `cfg.demo_broken` of the rows are broken on purpose, alternating a missing file (404) and a
    corrupt JPEG, so failure accounting is exercised on every demo run.
    """
    rng = random.Random(cfg.seed)
    rows = []
    for i in range(cfg.demo_images):
        shape, size = rng.choice(SHAPES), rng.choice(list(SIZES))
        colour, background = rng.sample(list(COLOURS), 2)
        name = f"images/{i:06d}.jpg"
        path = site_dir / name
        if not path.exists():
            buf = io.BytesIO()
            render_demo_image(shape, colour, background, size, cfg.image_size).save(buf, format="JPEG", quality=95)
            atomic_write_bytes(path, buf.getvalue())
        rows.append((name, f"a {size} {colour} {shape} on a {background} background"))
    for j in range(cfg.demo_broken):
        # Spread over the list, so failures land in several shards as they do on the web.
        at = (j + 1) * len(rows) // (cfg.demo_broken + 1)
        if j % 2 == 0:
            rows.insert(at, (f"images/missing-{j}.jpg", "a picture that is not there"))
        else:
            name = f"images/corrupt-{j}.jpg"
            # A JPEG signature over garbage: served as image/jpeg, fails to decode.
            atomic_write_bytes(site_dir / name, b"\xff\xd8\xff\xe0" + random.Random(j).randbytes(2048))
            rows.insert(at, (name, "a picture that does not decode"))
    return rows


# ---------------------------------------------------------------------------------------------
# Url lists


def check_url_list(path: Path, input_format: str, url_col: str, caption_col: str) -> int:
    """Validate a url list before any download; returns its number of rows.

    Raises:
        CorpusError: unsupported format, unreadable file, missing columns, or no rows.
    """
    if input_format not in URL_LIST_FORMATS:
        raise CorpusError(f"corpus.input_format={input_format!r}: use one of {', '.join(URL_LIST_FORMATS)}")
    if not path.is_file():
        raise CorpusError(f"corpus.url_list={str(path)!r}: no such file (give a {input_format} file with columns "
                          f"{url_col!r} and {caption_col!r}, or `demo`)")
    if input_format != "parquet":
        check_text_list(path, input_format)
    try:
        if input_format == "parquet":
            parquet = pq.ParquetFile(path)
            columns, rows = parquet.schema_arrow.names, parquet.metadata.num_rows
        else:
            parse = pa_csv.ParseOptions(delimiter="\t" if input_format.startswith("tsv") else ",")
            compression = "gzip" if input_format.endswith(".gz") else None
            with pa.input_stream(path, compression=compression) as stream, \
                    pa_csv.open_csv(stream, parse_options=parse) as reader:
                columns = reader.schema.names
                missing = [c for c in (url_col, caption_col) if c not in columns]
                rows = 0 if missing else sum(batch.num_rows for batch in reader)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for unreadable input
        # pyarrow quotes the offending row: one line, with what a terminal would act on escaped
        raise CorpusError(f"{path}: cannot be read as {input_format} "
                          f"({type(err).__name__}: {printable(first_line(err))})") from None
    missing = [c for c in (url_col, caption_col) if c not in columns]
    if missing:
        raise CorpusError(
            f"{path}: column(s) {missing} not found; its columns are {columns[:12]}. Set corpus.url_col / "
            "corpus.caption_col to the names used in the file (a header row is required for csv/tsv)"
        )
    if rows == 0:
        raise CorpusError(f"{path}: the url list has no rows")
    return rows


def check_text_list(path: Path, input_format: str) -> None:
    """A csv/tsv url list must be text: pyarrow's parse error would otherwise quote its binary bytes
    to the terminal. Names the format a Parquet or gzip file needs instead.

    Raises:
        CorpusError: the file is Parquet, gzip where the format says plain text, or binary.
    """
    with open(path, "rb") as fh:
        head = fh.read(4096)
    formats = "a csv or tsv text list with a header row (optionally .gz), or a parquet file"
    if head.startswith(b"PAR1"):
        raise CorpusError(f"{path} is a Parquet file, not a {input_format} text list: set corpus.input_format=parquet")
    if head.startswith(b"\x1f\x8b"):  # gzip's magic number (RFC 1952)
        if not input_format.endswith(".gz"):
            raise CorpusError(f"{path} is gzip-compressed: set corpus.input_format={input_format}.gz")
        with contextlib.suppress(zlib.error):
            head = zlib.decompressobj(wbits=31).decompress(head)
    controls = sum(b < 32 and b not in b"\t\n\r\f" for b in head)
    if b"\0" in head or controls > 1 + len(head) // 100:  # a stray escape in a caption is still text
        raise CorpusError(f"{path} is not a {input_format} text list (binary data; it starts with {head[:16]!r}): "
                          f"give {formats}, and set corpus.input_format to its format")


def printable(text: str, limit: int = 160) -> str:
    """`text` cut to `limit` characters, with control and other unprintable characters escaped."""
    text = text[:limit]
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


# ---------------------------------------------------------------------------------------------
# Url lists read from Hugging Face datasets

HF_DATASETS = "hf://datasets/"
HF_FORM = "hf://datasets/<owner>/<name>[@<revision>][/<config>][:<split>]"
_HF_REPO = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/@]+))?(?:/(?P<config>[^/@]+))?")


@dataclass(frozen=True)
class HfUrlList:
    """`corpus.url_list=hf://datasets/<owner>/<name>[@<revision>][/<config>][:<split>]`: a url +
    caption table read with `datasets.load_dataset(path, config, split=split, revision=revision)`.

    The split defaults to `train` and may be any split `datasets` reads (`validation`, `train[:10000]`,
    `train+validation`); the config defaults to the dataset's default; the revision (a branch, tag or
    commit, with a `/` in it written %2F: `@refs%2Fconvert%2Fparquet`) to the main branch. `@` names
    a revision as in huggingface_hub's own hf:// paths. `hf://datasets/` followed by an absolute path
    reads a local directory in the Hub's layout (a mirror; the tests' offline stand-in for the Hub)
    the same way; there a last path segment that is not a directory names the config, and there is no
    revision.
    """

    path: str
    """The repo id, or the absolute path of a local dataset directory."""
    config: str | None
    split: str
    revision: str | None

    @property
    def local(self) -> bool:
        return self.path.startswith("/")


def is_hf_url_list(url_list: str) -> bool:
    """Whether `corpus.url_list` names a Hugging Face dataset (`hf://...`) rather than a file."""
    return url_list.startswith("hf://")


def parse_hf_url_list(url_list: str) -> HfUrlList:
    """`corpus.url_list` as an `HfUrlList`; reads nothing but, for a local directory, whether its
    last path segment is a directory.

    Raises:
        CorpusError: not of the form `HF_FORM` (or `hf://datasets/` + an absolute path), in one line.
    """
    rest = url_list[len(HF_DATASETS):] if url_list.startswith(HF_DATASETS) else ""
    where, colon, split = rest.partition(":")
    split = split if colon else "train"
    found = None if where.startswith("/") else _HF_REPO.fullmatch(where)
    if not (found or where.startswith("/")) or not split or any(c.isspace() for c in split):
        raise CorpusError(f"corpus.url_list={url_list!r} is not a Hugging Face dataset: write {HF_FORM} (the split "
                          "defaults to train; e.g. hf://datasets/google-research-datasets/conceptual_captions with "
                          "corpus.url_col=image_url), or hf://datasets/ and the absolute path of a local dataset "
                          "directory in the Hub's layout")
    if found is None:  # a local directory
        path = Path(os.path.normpath(where))
        if not path.is_dir() and path.parent.is_dir() and path.parent != path:
            return HfUrlList(str(path.parent), path.name, split, None)
        return HfUrlList(str(path), None, split, None)
    revision = found["revision"]
    return HfUrlList(found["repo"], found["config"], split, urllib.parse.unquote(revision) if revision else None)


def hf_url_list_identity(url_list: str) -> dict[str, Any]:
    """What the corpus fingerprint hashes for an hf:// url list (storage.corpus_fingerprint), read
    without loading the dataset: its repo, config, split and revision, and for a local directory the
    sha256 of each of its files (but hidden ones). A Hub dataset is thus read once, when its corpus is
    first built, and a later change on the Hub keeps the corpus and url list already made (as it
    would for a url list file left in place): pin `@<commit>` to make the setting name the content.

    Raises:
        CorpusError: `url_list` is malformed (`parse_hf_url_list`).
    """
    spec = parse_hf_url_list(url_list)
    identity: dict[str, Any] = asdict(spec)
    root = Path(spec.path)
    if spec.local and root.is_dir():
        identity["files"] = {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*"))
                             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}
    return identity


def hf_url_list_path(out_dir: Path) -> Path:
    """Where the corpus stage writing `out_dir` keeps the url list it read from a Hugging Face dataset."""
    return out_dir.parent / f"{out_dir.name}.urls.parquet"


def write_hf_url_list(cfg: CorpusConfig, path: Path) -> int:
    """Load the dataset `cfg.url_list` names and write its `cfg.url_col` and `cfg.caption_col`
    columns to `path` as a Parquet url list, atomically (a temporary name, renamed when complete);
    returns its rows. `datasets` keeps the dataset in its own cache (`HF_HOME`), as it always does.

    Raises:
        CorpusError: in one line naming the setting and the fix: the string is malformed; the dataset
            cannot be loaded (unknown repo, config or split, or an empty one; the Hub unreachable;
            `datasets` absent); a column is missing or not text.
    """
    spec = parse_hf_url_list(cfg.url_list)
    setting = f"corpus.url_list={cfg.url_list!r}"
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{setting}: reading a Hugging Face dataset needs the `datasets` package: "
                          "pip install -e '.[data]'") from None
    try:
        ds = datasets.load_dataset(spec.path, spec.config, split=spec.split, revision=spec.revision)
    except Exception as err:  # noqa: BLE001 - datasets and huggingface_hub raise many types
        raise CorpusError(f"{setting}: cannot load the dataset ({type(err).__name__}: {printable(first_line(err))}); "
                          f"check the repo id, config and split ({HF_FORM}) and that the Hub is reachable (with "
                          "HF_HUB_OFFLINE=1 only a dataset already in the Hugging Face cache loads)") from None
    columns = list(dict.fromkeys((cfg.url_col, cfg.caption_col)))
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise CorpusError(f"{setting}: the dataset has no column(s) {missing}; its columns are "
                          f"{ds.column_names[:12]}: set corpus.url_col / corpus.caption_col to the columns holding "
                          "the image url and its caption")
    fields = [ds.data.schema.field(c) for c in columns]
    not_text = [f"{f.name} ({f.type})" for f in fields if not (pa.types.is_string(f.type)
                                                              or pa.types.is_large_string(f.type))]
    if not_text:
        raise CorpusError(f"{setting}: column(s) {', '.join(not_text)} are not text: set corpus.url_col / "
                          "corpus.caption_col to a column of urls and one of captions")
    with stop_when_full(path.parent, "nothing else was written"):
        tmp = temp_path_for(path)
        try:
            with pq.ParquetWriter(tmp, pa.schema(fields)) as writer:
                for batch in ds.select_columns(columns).with_format("arrow").iter(batch_size=65536):
                    writer.write_table(batch)
            flush_to_disk(tmp)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    log.info("corpus: %d urls of %s (fingerprint %s) written to %s", ds.num_rows, cfg.url_list, ds._fingerprint, path)
    return ds.num_rows


# ---------------------------------------------------------------------------------------------
# The stage


def build_corpus(cfg: CorpusConfig, out_dir: Path, cluster: ClusterConfig | None = None) -> Path:
    """Run the corpus stage into `out_dir` (skipped when its manifest exists); returns `out_dir`.
    With `cluster` on engine ray, img2dataset's ray distributor downloads the shards on its workers.

    An hf:// url list is first written to `hf_url_list_path(out_dir)`, unless a run before wrote it.

    Raises:
        CorpusError: bad url list (before downloading), img2dataset wrote fewer rows than listed,
            or the success rate is below `min_success_rate`.
    """
    manifest = read_manifest(out_dir)
    if manifest is not None:
        check_accepted_rate(out_dir, manifest, cfg)
        log.info("corpus %s is complete; skipping", out_dir)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.url_list == DEMO:
        site = out_dir.parent / f"{out_dir.name}.site"
        rows = write_demo_site(cfg, site)
        with serve_directory(site) as base_url:
            url_list = out_dir.parent / f"{out_dir.name}.urls.tsv"
            lines = ["url\tcaption"] + [f"{base_url}/{name}\t{caption}" for name, caption in rows]
            atomic_write_bytes(url_list, ("\n".join(lines) + "\n").encode())
            expected = check_url_list(url_list, "tsv", "url", "caption")
            run_img2dataset(cfg, url_list, "tsv", "url", "caption", out_dir, expected, cluster)
    elif is_hf_url_list(cfg.url_list):
        # Read from the Hub once: a rerun (after an interrupted download, say) takes the list written then.
        url_list = hf_url_list_path(out_dir)
        if not url_list.is_file():
            write_hf_url_list(cfg, url_list)
        expected = check_url_list(url_list, "parquet", cfg.url_col, cfg.caption_col)
        run_img2dataset(cfg, url_list, "parquet", cfg.url_col, cfg.caption_col, out_dir, expected, cluster)
    else:
        url_list = Path(cfg.url_list)
        expected = check_url_list(url_list, cfg.input_format, cfg.url_col, cfg.caption_col)
        run_img2dataset(cfg, url_list, cfg.input_format, cfg.url_col, cfg.caption_col, out_dir, expected, cluster)
    report = check_shard_stats(out_dir, expected, cfg)
    write_manifest(out_dir, {
        "stage": "corpus",
        "schema_version": CORPUS_SCHEMA_VERSION,
        "url_list": str(cfg.url_list),
        "config": cfg.__dict__,
        **report,
    })
    return out_dir


@dataclass(frozen=True)
class Corpus:
    """A complete corpus stage output."""

    path: Path

    @property
    def shard_success_rates(self) -> list[dict[str, Any]]:
        """Per shard: its name, urls, images downloaded and their share (what the manifest recorded
        from img2dataset's stats)."""
        manifest = read_manifest(self.path, "corpus") or {}
        return [{"shard": s["name"], "urls": s["count"], "downloaded": s["successes"],
                 "success rate": f"{s['successes'] / max(s['count'], 1):.1%}"} for s in manifest.get("shards", [])]


def check_accepted_rate(out_dir: Path, manifest: dict, cfg: CorpusConfig) -> None:
    """A completed corpus may have been accepted under a lower bar than this config's (the bar is
    not part of its fingerprint): it must clear this config's too."""
    rate = manifest.get("success_rate", 1.0)  # a corpus stage output made elsewhere may not record it
    if rate < cfg.min_success_rate:
        raise CorpusError(f"{out_dir} was accepted with {rate:.1%} of its images downloaded, below this config's "
                          f"corpus.min_success_rate={cfg.min_success_rate:.0%}: lower the bar to use it, or delete its "
                          "manifest.json, its worst shards and their _stats.json files, then run the corpus stage "
                          "again to retry their urls")


def img2dataset_args(cfg: CorpusConfig, url_list: Path, input_format: str, url_col: str, caption_col: str,
                     out_dir: Path, distributor: str = "multiprocessing") -> list[str]:
    """Every img2dataset argument that matters, explicit (datacomp style). Its `ray` distributor runs
    a Ray task of one CPU per shard (`processes_count` is the multiprocessing distributor's alone), each
    downloading on `corpus.threads` threads into the output folder, which every node must mount."""
    args = {
        "url_list": str(url_list),
        "input_format": input_format,
        "url_col": url_col,
        "caption_col": caption_col,
        "output_format": "parquet",
        "output_folder": str(out_dir.resolve()),  # Ray workers run in their own directories
        "image_size": cfg.image_size,
        "resize_mode": cfg.resize_mode,
        "resize_only_if_bigger": False,
        "encode_format": "jpg",
        "encode_quality": 95,
        "number_sample_per_shard": cfg.shard_size,
        "processes_count": cfg.processes,
        "thread_count": cfg.threads,
        "retries": cfg.retries,
        "timeout": cfg.timeout_s,
        "incremental_mode": "incremental",
        "distributor": distributor,
        "extract_exif": False,
        "compute_hash": "sha256",
        "enable_wandb": False,
    }
    return [f"--{k}={v}" for k, v in args.items()]


def run_img2dataset(cfg: CorpusConfig, url_list: Path, input_format: str, url_col: str, caption_col: str, out_dir: Path,
                    expected_rows: int, cluster: ClusterConfig | None = None) -> None:
    """img2dataset as a subprocess: it installs signal handlers and spawns workers, neither of which
    is safe inside a Prefect worker thread (docs/choices.md). Progress (shards done, rate, ETA) is logged
    from the stats file it writes per finished shard; its output goes to a temporary file (a long
    download would otherwise pile it up in memory) and its tail to the log. Shards a rerun cannot
    trust are discarded first (the module docstring says which)."""
    on_ray = cluster is not None and cluster.engine == "ray"
    entry = "import sys; from img2dataset.main import main; sys.exit(main())"
    args = img2dataset_args(cfg, url_list, input_format, url_col, caption_col, out_dir,
                            "ray" if on_ray else "multiprocessing")
    command = [sys.executable, "-c", entry, *args]
    total = math.ceil(expected_rows / cfg.shard_size)
    with (driver_address(cluster) if on_ray else contextlib.nullcontext()) as ray_address, \
            download_claim(out_dir) as claim, tempfile.TemporaryFile("w+") as output:
        # Read after joining the cluster, whose credentials Ray puts in this process's environment.
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
        if ray_address:  # img2dataset joins the cluster as a driver of its own
            env["RAY_ADDRESS"] = ray_address
        discard_untrusted_shards(out_dir)
        marker = out_dir / DOWNLOAD_MARKER
        atomic_write_bytes(marker, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                               "started": time.time()}).encode())
        # an interrupted run's shards (those kept) are not fetched again
        already = reported = len(list(out_dir.glob("*_stats.json")))
        log.info("corpus: img2dataset %s -> %s (%s x %d threads), %d/%d shards already done", url_list, out_dir,
                 f"Ray at {ray_address}, a task per shard" if on_ray else f"{cfg.processes} processes", cfg.threads,
                 already, total)
        started = time.perf_counter()
        # Its own process group, ended with this process however it ends (thinkdiff/processes.py), holding
        # the claim until its last process is gone; Ctrl-C reaches only us.
        proc = spawn(command, stdout=output, stderr=subprocess.STDOUT, text=True, env=env, pass_fds=(claim,))
        try:
            while True:
                try:
                    proc.wait(timeout=PROGRESS_POLL_S)
                except subprocess.TimeoutExpired:
                    pass
                os.utime(marker)  # shards finished after the last renewal are discarded by a rerun
                done = len(list(out_dir.glob("*_stats.json")))
                if done != reported:
                    reported = done
                    per_s = (done - already) / (time.perf_counter() - started)
                    log.info("corpus: %d/%d shards downloaded, %.2f shards/min, ETA %.0fs", done, total, 60 * per_s,
                             max(total - done, 0) / max(per_s, 1e-9))
                if proc.returncode is not None:
                    break
        except BaseException:
            stop_process_group(proc)
            raise
        finally:
            if proc.returncode is not None:  # seen ending: every shard it wrote was written while we watched
                marker.unlink(missing_ok=True)
        output.seek(0)
        tail = "\n".join(line.rstrip() for line in collections.deque(output, maxlen=15) if line.strip())
    log.info("corpus: img2dataset finished in %.1fs (exit %d); output tail:\n%s", time.perf_counter() - started,
             proc.returncode, tail)
    if proc.returncode != 0:
        raise IncompleteDownloadError(f"img2dataset exited with {proc.returncode} for {url_list}; last output:\n{tail}")


@contextlib.contextmanager
def download_claim(out_dir: Path) -> Iterator[int]:
    """Hold `out_dir`'s download lock (an flock, waiting while another download holds it); yields its
    fd, for the download's processes to inherit. It goes with the last process holding it."""
    fd = os.open(out_dir / DOWNLOAD_LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (out_dir / DOWNLOAD_MARKER).read_text() if (out_dir / DOWNLOAD_MARKER).is_file() else "?"
            log.info("corpus: another img2dataset download (%s) is writing %s; waiting for it to end", holder, out_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def discard_untrusted_shards(out_dir: Path) -> list[str]:
    """Delete the shards a rerun must not count (the module docstring says which), so img2dataset
    downloads them again; returns their names. Call it holding `download_claim`."""
    marker = out_dir / DOWNLOAD_MARKER
    watched_until = marker.stat().st_mtime_ns if marker.is_file() else None
    discarded = []
    for stats_path in sorted(out_dir.glob("*_stats.json")):
        stem = stats_path.name.removesuffix("_stats.json")
        if watched_until is not None and stats_path.stat().st_mtime_ns > watched_until:
            problem = "finished after the download that wrote it stopped being watched (its parent was killed)"
        else:
            problem = shard_problem(out_dir, stem)
        if problem is not None:
            log.warning("corpus: shard %s.parquet %s; downloading it again", stem, problem)
            (out_dir / f"{stem}.parquet").unlink(missing_ok=True)
            stats_path.unlink()
            discarded.append(f"{stem}.parquet")
    marker.unlink(missing_ok=True)
    return discarded


def shard_problem(out_dir: Path, stem: str) -> str | None:
    """Why shard `stem` (e.g. 00003) disagrees with its stats file, or None when it agrees: its
    Parquet file is readable and has the rows and `success` rows the stats count."""
    try:
        stats = json.loads((out_dir / f"{stem}_stats.json").read_text())
        count, successes = int(stats["count"]), int(stats["successes"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        return f"has a damaged {stem}_stats.json ({type(err).__name__})"
    path = out_dir / f"{stem}.parquet"
    if not path.is_file():
        return "is missing (its stats file is there)"
    try:
        parquet = pq.ParquetFile(path)
        rows = parquet.metadata.num_rows
        ok = sum(s == "success" for s in parquet.read(columns=["status"]).column("status").to_pylist()) if rows else 0
    except (pa.ArrowException, OSError, KeyError) as err:
        return f"is not a readable img2dataset Parquet file ({printable(first_line(err))})"
    if (rows, ok) != (count, successes):
        return f"holds {rows} rows, {ok} downloaded, where {stem}_stats.json counts {count}, {successes} downloaded"
    return None


def check_shard_stats(out_dir: Path, expected_rows: int, cfg: CorpusConfig) -> dict:
    """Read every `{shard}_stats.json`, log per-shard failures, and enforce the success rate.

    img2dataset never fails a run for failed shards (and its ray distributor silently writes
    nothing without ray), so the totals are checked here.
    """
    expected_shards = math.ceil(expected_rows / cfg.shard_size)
    shards, errors, count, successes = [], collections.Counter(), 0, 0
    for i in range(expected_shards):
        stats_path = out_dir / f"{i:05d}_stats.json"
        if not stats_path.is_file() or not (out_dir / f"{i:05d}.parquet").is_file():
            raise IncompleteDownloadError(f"{out_dir}: shard {i:05d} is missing (img2dataset wrote no stats for it); "
                                          "rerun the stage to retry it")
        try:
            stats = json.loads(stats_path.read_text())
        except json.JSONDecodeError as err:
            raise DataContractError(f"{stats_path} is not valid JSON ({err}): delete it and its shard "
                                    f"{stats_path.name.replace('_stats.json', '.parquet')}, "
                                    "then run the corpus stage again") from None
        problem = shard_problem(out_dir, f"{i:05d}")
        if problem is not None:
            raise IncompleteDownloadError(f"{out_dir / f'{i:05d}.parquet'}: the shard {problem}; rerun the corpus "
                                          "stage: it downloads that shard again")
        shard_errors = {k: v for k, v in stats.get("status_dict", {}).items() if k != "success"}
        errors.update(shard_errors)
        count += stats["count"]
        successes += stats["successes"]
        shards.append({
            "name": f"{i:05d}.parquet",
            "count": stats["count"],
            "successes": stats["successes"],
            "failed_to_download": stats["failed_to_download"],
            "failed_to_resize": stats["failed_to_resize"],
            "errors": shard_errors,
        })
        if stats["successes"] < stats["count"]:
            log.warning("corpus: shard %05d: %d/%d images ok; failures: %s", i, stats["successes"], stats["count"],
                        shard_errors)
    if count != expected_rows:
        raise IncompleteDownloadError(f"{out_dir}: img2dataset processed {count} of {expected_rows} listed urls; "
                                      "rerun the stage to finish it")
    rate = successes / count
    log.info("corpus: %d/%d images downloaded (%.1f%%) in %d shards", successes, count, 100 * rate, len(shards))
    if rate < cfg.min_success_rate:
        failing = [s for s in shards if s["successes"] < s["count"]]
        worst = sorted(failing, key=lambda s: s["successes"] / max(s["count"], 1))[:5]
        raise CorpusError(
            f"{out_dir}: only {successes}/{count} images downloaded ({rate:.1%} < corpus.min_success_rate="
            f"{cfg.min_success_rate:.0%}). Worst shards: "
            + ", ".join(f"{s['name']} {s['successes']}/{s['count']}" for s in worst)
            + ". Main errors: " + "; ".join(f"{k} x{v}" for k, v in errors.most_common(5))
            + ". To keep what was downloaded, run the stage again with a lower corpus.min_success_rate (it is "
            "not part of the corpus's fingerprint: nothing is downloaded again); to retry the failed urls, "
            "delete the worst shards and their _stats.json files first"
        )
    return {"count": count, "successes": successes, "success_rate": rate, "errors": dict(errors.most_common()),
            "shards": shards}


# ---------------------------------------------------------------------------------------------
# Reading


def corpus_shards(corpus_dir: Path) -> list[Path]:
    """The complete shards of a corpus directory (those with a stats file), in order, each checked
    to be a readable Parquet file (its footer, read once per file version).

    Raises:
        FileNotFoundError: the directory has no complete shards.
        IncompleteDownloadError: the corpus stage's download into it was interrupted.
        DataContractError: a shard is not a readable Parquet file (cut off, or not Parquet).
    """
    if (corpus_dir / DOWNLOAD_MARKER).is_file() and read_manifest(corpus_dir) is None:
        raise IncompleteDownloadError(f"{corpus_dir}: its download was interrupted ({DOWNLOAD_MARKER} is there): run "
                                      "the corpus stage again to finish it")
    shards = sorted(p for p in corpus_dir.glob("*.parquet") if (corpus_dir / f"{p.stem}_stats.json").is_file())
    if not shards:
        raise FileNotFoundError(f"{corpus_dir}: no complete corpus shards "
                                "(img2dataset parquet output with _stats.json)")
    for shard in shards:
        stat = shard.stat()
        corpus_shard_rows(shard, stat.st_size, stat.st_mtime_ns)
    return shards


def damaged_shard_fix(path: Path) -> str:
    return (f"delete it, {path.stem}_stats.json and the directory's manifest.json (if there is one), then run the "
            "corpus stage (or the img2dataset command that made it) again: it downloads that shard again")


@functools.lru_cache(maxsize=4096)
def corpus_shard_rows(path: Path, size: int | None = None, mtime_ns: int | None = None) -> int:
    """A corpus shard's number of rows, from its footer; `size` and `mtime_ns` key the cache.

    Raises:
        DataContractError: not a readable Parquet file, naming it and the fix (pyarrow names no file).
    """
    with readable_parquet(path, damaged_shard_fix(path)):
        return pq.read_metadata(path).num_rows


def read_corpus_shard(path: Path) -> Iterator[CorpusImage]:
    """Successful rows of one shard, decoded; rows whose bytes do not decode carry an error instead."""
    fix = damaged_shard_fix(path)
    with readable_parquet(path, fix):
        parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    needed = {"key", "jpg", "status"}
    if not needed <= names:
        raise DataContractError(f"{path}: corpus shard lacks columns {sorted(needed - names)}; "
                                "expected img2dataset parquet output")
    columns = ["key", "status", "jpg"] + (["caption"] if "caption" in names else [])
    batches = parquet.iter_batches(columns=columns, batch_size=64)
    while True:
        with readable_parquet(path, fix):  # a shard cut mid-column fails only when that batch is read
            batch = next(batches, None)
        if batch is None:
            return
        rows = batch.to_pydict()
        captions = rows.get("caption") or [""] * batch.num_rows
        for key, status, data, caption in zip(rows["key"], rows["status"], rows["jpg"], captions, strict=True):
            if status != "success":
                continue
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
                yield CorpusImage(key=key, image=image.convert("RGB"), caption=caption or "")
            except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
                yield CorpusImage(key=key, image=None, caption=caption or "", error=f"{type(err).__name__}: {err}")
