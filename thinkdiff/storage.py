"""Stage directories, fingerprints and atomic writes shared by every stage.

Each stage writes into `{paths.root}/{stage}/{fingerprint}/`: files appear under temporary names
and are renamed when complete, and `manifest.json` is written last. A stage whose manifest exists
is complete and skipped; an interrupted one resumes at its first missing file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from thinkdiff.config import RunConfig, fingerprint
from thinkdiff.errors import ConfigError, DataContractError, DiskFullError, first_line

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# tempfile makes its files 0600 and its directories 0700; what is renamed into place gets the mode
# a plain open() or mkdir() would give under the umask, so a paths.root shared by a team's workers
# stays readable to all of them. Read once, at import, before any writer thread exists.
_UMASK = _process_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK
CORPUS_SCHEMA_VERSION = 1
FEATURES_SCHEMA_VERSION = 1
TRAIN_SCHEMA_VERSION = 2  # 2: train.batch_size is the global batch (it was per process)
# 2: the LLaVA judge's prompt has CoBSAT's system line (judge.llava_prompt). 3: the ThinkDiff generator
# bans stop tokens; images are judged as CoBSAT does (saved as JPEG at quality 75 under CoBSAT's file
# names and read back; LLaVA pads them to a square and answers up to 512 tokens); rows keep the VLM's
# prompt and answer and the judge's replies.
EVAL_SCHEMA_VERSION = 3
# Settings that change how a stage runs, is observed or kept, not what it computes: outside the fingerprint.
# The corpus's: how fast it downloads, and the bar its success rate must clear (a failed check is
# rerun with a lower bar on the shards already downloaded).
_CORPUS_OPERATIONAL = ("processes", "threads", "min_success_rate")
_CORPUS_DEMO_ONLY = ("demo_images", "demo_broken", "seed")
_FEATURES_OPERATIONAL = ("preprocess_workers",)
_TRAIN_OPERATIONAL = ("checkpoint_every", "keep_last", "log_every", "launch_args", "compile", "decoder_attention")


def corpus_fingerprint(cfg: RunConfig) -> str:
    """Hashes the corpus settings and, for a real url list, the list's content; for a Hugging Face
    dataset (hf://datasets/...), what names it, read without downloading it (and its format setting
    is left out): thinkdiff.data.corpus.hf_url_list_identity."""
    source = cfg.corpus.url_list
    hf = source.startswith("hf://")
    if hf:
        from thinkdiff.data.corpus import hf_url_list_identity  # that module imports this one

        content: Any = hf_url_list_identity(source)
    else:
        content = source if source == "demo" else file_digest(Path(source))
    ignored = _CORPUS_OPERATIONAL + (() if source == "demo" else _CORPUS_DEMO_ONLY) + (("input_format",) if hf else ())
    settings = {k: v for k, v in cfg.corpus.__dict__.items() if k not in ignored}
    return fingerprint({"stage": "corpus", "schema": CORPUS_SCHEMA_VERSION, "corpus": settings, "urls": content})


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime) so repeated fingerprints stay cheap."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus.url_list={str(path)!r}: no such file (give a url list, or `demo`)") from None
    if not path.is_file():
        raise IsADirectoryError(f"corpus.url_list={str(path)!r} is a directory: "
                                "give the url list file in it (or `demo`)")
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upstream_fingerprint(cfg: RunConfig, stage: str, directory: Path | None = None) -> str:
    """The fingerprint of the `stage` output a later stage reads from `directory`: this config's own
    (no directory, or the config's own stage directory), else the one the directory's manifest
    records, else (an img2dataset output made elsewhere) a hash of its resolved path. A stage fed
    another input than its config's therefore writes to a directory of its own."""
    own = {"corpus": corpus_fingerprint, "features": features_fingerprint}[stage]
    if directory is None:
        return own(cfg)
    try:
        if directory.resolve() == stage_dir(cfg, stage).resolve():
            return own(cfg)
    except FileNotFoundError:  # the config's url list is absent: the directory cannot be its corpus
        pass
    recorded = (read_manifest(directory, stage) or {}).get("fingerprint")
    return recorded or fingerprint({"stage": stage, "directory": str(directory.resolve())})


def features_fingerprint(cfg: RunConfig, corpus_dir: Path | None = None) -> str:
    return fingerprint({
        "stage": "features",
        "schema": FEATURES_SCHEMA_VERSION,
        "corpus": upstream_fingerprint(cfg, "corpus", corpus_dir),
        "features": {k: v for k, v in cfg.features.__dict__.items() if k not in _FEATURES_OPERATIONAL},
        "variant": cfg.variant,
        "model": (cfg.models.vision if cfg.variant == "clip" else cfg.models.vlm).__dict__,
    })


def train_fingerprint(cfg: RunConfig, features_dir: Path | None = None) -> str:
    train = {k: v for k, v in cfg.train.__dict__.items() if k not in _TRAIN_OPERATIONAL}
    return fingerprint({
        "stage": "train",
        "schema": TRAIN_SCHEMA_VERSION,
        "features": upstream_fingerprint(cfg, "features", features_dir),
        "train": train,
        "variant": cfg.variant,
        "t5": cfg.models.t5.__dict__,
    })


def stage_root(cfg: RunConfig) -> Path:
    """`paths.root`, refused with one line when it (or a directory above it) is an existing file: no
    stage directory could be made under it. Checked here, where every stage's directory is named,
    rather than in validation: the root need not exist yet, and is made with the first stage's."""
    root = Path(cfg.paths.root)
    for existing in (root, *root.parents):
        try:
            # In this order: another process may make the directory between the two checks.
            if not existing.exists():
                continue
            if existing.is_dir():
                return root
        except OSError:  # unreadable: the first mkdir will say why
            return root
        where = "is a file" if existing == root else f"is under {existing}, a file"
        raise ConfigError(f"paths.root={str(root)!r} {where}, not a directory: set paths.root to a directory "
                          "(it is made if absent), or move that file away")
    return root


def recorded_path(path: Path, base: Path) -> str:
    """How a manifest, meta file or MLflow tag records `path`: relative to `base` (paths.root, or the
    directory of the record itself for the files it holds) when it lies inside, so that a moved or
    copied root finds its own files and never the old root's; absolute when it lies outside."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(base.resolve()))
    except ValueError:
        return str(resolved)


def recorded_location(recorded: str, base: Path) -> Path:
    """The path `recorded_path` recorded against `base` (an absolute one, as records made before
    paths were relative hold, stays as it is)."""
    return base / recorded


def stage_dir(cfg: RunConfig, stage: str, upstream: Path | None = None) -> Path:
    """`{paths.root}/{stage}/{fingerprint}`; `upstream` is the directory the stage reads when it is
    given one (a corpus for features, a feature store for train), else the config's own."""
    if stage == "corpus":
        return stage_root(cfg) / stage / corpus_fingerprint(cfg)
    fingerprints: dict[str, Callable[[RunConfig, Path | None], str]] = {"features": features_fingerprint,
                                                                        "train": train_fingerprint}
    return stage_root(cfg) / stage / fingerprints[stage](cfg, upstream)


KEPT_FILES = "the files completed before it are kept"
# A full disk where no errno survives: safetensors' Rust io::Error, or a library's own message.
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|StorageFull|QuotaExceeded")
# torch.save's writer (caffe2's inline_container.cc) drops the errno: "PytorchStreamWriter failed writing file
# data/0: file write failed", or "unexpected pos N vs M" when a short write went unnoticed until the next one.
_TORCH_WRITE_FAILED = re.compile(r"file write failed|unexpected pos \d+ vs \d+")
LOW_SPACE_BYTES = 64 << 20
"""Below this much free space a write that failed without an errno (torch.save's) is taken for a full disk."""


def free_bytes(directory: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding `directory` (or the
    nearest existing directory above it); None when that cannot be read."""
    for existing in (directory, *directory.parents):
        try:
            st = os.statvfs(existing)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None
        return st.f_bavail * st.f_frsize
    return None


def _outside_temp_dirs(directory: Path) -> Path:
    """`directory`, or the directory that holds the temporary one it is in (`.name.XXXX.tmp`, see
    temp_dir_for): a message names where the operator frees space, not a name that is about to go."""
    parts = directory.parts
    for i, part in enumerate(parts):
        if part.startswith(".") and part.endswith(".tmp"):
            return Path(*parts[:i])
    return directory


def _mount_point(directory: Path) -> Path | None:
    path = Path(os.path.abspath(directory))
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            if os.path.ismount(candidate):
                return candidate
    return None


def disk_full_error(error: BaseException, directory: Path, kept: str = KEPT_FILES) -> DiskFullError | None:
    """A DiskFullError naming `directory` when `error` is a write that ran out of space there, else
    None. Call it before a failed writer's partial output is removed: a torch.save failure carries no
    errno and is judged by the free space its partial file left."""
    if isinstance(error, DiskFullError):
        reason = error.reason
    elif isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = os.strerror(error.errno)
    elif found := _NO_SPACE_TEXT.search(str(error)):
        reason = found.group()
    elif isinstance(error, RuntimeError) and (failed := _TORCH_WRITE_FAILED.search(str(error))):
        free = free_bytes(directory)
        if free is None or free >= LOW_SPACE_BYTES:
            return None  # a write that failed for another reason: its own message says more
        reason = f"torch.save: {failed.group()}, with {free >> 20} MiB free"
    else:
        return None
    mount = _mount_point(directory)
    where = f"; the filesystem is mounted at {mount}" if mount is not None and mount != Path("/") else ""
    return DiskFullError(str(_outside_temp_dirs(directory)), reason + where, kept)


@contextlib.contextmanager
def stop_when_full(directory: Path, kept: str = KEPT_FILES) -> Iterator[None]:
    """Turns a write under `directory` that ran out of space into a DiskFullError naming it (the
    writers inside remove their own temporary files first)."""
    try:
        yield
    except Exception as error:
        full = disk_full_error(error, directory, kept)
        if full is None:
            raise
        raise full from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, then rename over `path`.

    Raises:
        DiskFullError: the disk ran out of space (nothing is left behind, `path` is as it was).
    """
    with stop_when_full(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def flush_to_disk(path: Path) -> None:
    """fsync a file another library wrote (Parquet, torch.save) before it is renamed into place: after
    a power loss, a renamed but unflushed file can be empty under its final name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_image(path: Path, image: Image.Image, **options: Any) -> None:
    """An image encoded in the format its suffix names (`options` go to Pillow's save), written
    atomically."""
    buf = io.BytesIO()
    image.save(buf, format=Image.registered_extensions()[path.suffix.lower()], **options)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_jsonl(path: Path, fix: str) -> list[dict]:
    """The complete JSON lines of an append-only log; a torn last line (a writer killed mid-line) is
    dropped and cut off the file. Any other bad line raises, naming the file, the line and `fix`."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines(keepends=True)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                atomic_write_bytes(path, "".join(lines[:-1]).encode())
                return rows
            raise DataContractError(f"{path}, line {i + 1}: not a JSON line ({err}); {fix}") from None
    if lines and not lines[-1].endswith("\n"):  # whole, but cut before its newline: the next append starts a line
        atomic_write_bytes(path, ("".join(lines) + "\n").encode())
    return rows


def temp_path_for(path: Path) -> Path:
    """A unique temporary sibling of `path`, for writers that need a file name (e.g. Parquet)."""
    with stop_when_full(path.parent):  # out of inodes, or the directory cannot be made
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    return Path(tmp)


def temp_dir_for(path: Path) -> Path:
    """A new temporary sibling directory of `path`, to fill and then rename into place."""
    with stop_when_full(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(DIR_MODE)
    return tmp


def read_manifest(directory: Path, stage: str | None = None) -> dict[str, Any] | None:
    """The stage's manifest, or None when the stage has not completed. With `stage`, a directory
    holding another stage's output is refused."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataContractError(f"{path} is not valid JSON ({err}); delete it to let the stage rerun") from err
    if not isinstance(manifest, dict):
        raise DataContractError(f"{path} holds a JSON {type(manifest).__name__}, not a manifest object; "
                                "delete it to let the stage rerun")
    if stage is not None and manifest.get("stage") != stage:
        held = (f"the output of the {manifest['stage']} stage" if "stage" in manifest
                else "a manifest that names no stage")
        raise DataContractError(f"{directory} holds {held}; give the directory of a {stage} stage output")
    return manifest


@contextlib.contextmanager
def readable_parquet(path: Path, fix: str):
    """Turns pyarrow's error for a damaged Parquet file (truncated, foreign, cut mid-column), which
    names no file, into one that names `path` and the `fix`."""
    try:
        yield
    except (FileNotFoundError, PermissionError):  # the file is not damaged: its own message says what is wrong
        raise
    except (pa.ArrowException, OSError) as err:  # a damaged footer surfaces as a plain OSError ("deserialize thrift")
        raise DataContractError(f"{path} is not a readable Parquet file ({first_line(err)}): {fix}") from None


def write_manifest(directory: Path, payload: dict[str, Any]) -> None:
    atomic_write_json(directory / MANIFEST, payload)


def remove_stale_temp_files(path: Path) -> None:
    """Delete the leftovers of writers of `path` killed mid-write (`.name.XXXX.tmp`); call it only
    while holding `path`'s claim (`exclusive`), so no live writer's file goes."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(lock_path: Path, waiting: str, *, wait: bool = True, holder: str | None = None) -> Iterator[int | None]:
    """Hold an exclusive lock on `lock_path` (created if needed): yields the locked file descriptor
    once held (a child given it, `pass_fds`, keeps the lock held while it lives); while another
    process or thread holds it, logs `waiting` and waits for it, or with `wait=False` yields None at
    once. With `holder` (who this is, e.g. pid and host), the file's content is replaced by
    it once held, so that a refused or waiting process can name the holder. The lock goes with its
    holder, so a killed writer never leaves it taken (its name stays in the file, read only while
    someone holds it)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield None
                return
            log.info("%s", waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        if holder is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def git_revision() -> str:
    """The checkout's commit (with `-dirty` when it has local changes), or `unknown` outside git."""
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}-dirty" if dirty else rev
