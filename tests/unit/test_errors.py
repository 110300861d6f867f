"""Covers: damaged or impossible inputs an operator meets are one line naming the file or setting and
the fix: a full disk under the atomic writers and the checkpoint writer (which directory, nothing
half-written left, a rerun completes), and a `paths.root` that names a file."""

from __future__ import annotations

import errno
import os
import pickle
import re

import pytest
import torch

from thinkdiff import storage
from thinkdiff.cli import main
from thinkdiff.errors import ConfigError, DiskFullError
from thinkdiff.models.aligner import Aligner, AlignerConfig
from thinkdiff.registry import tracking_uri
from thinkdiff.storage import atomic_write_bytes, stage_dir
from thinkdiff.train import checkpoint as ckpt


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def visible(directory):
    """What a reader of `directory` sees, temporary files included."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def test_a_full_disk_under_an_atomic_write_names_the_directory_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "store" / "manifest.json"
    atomic_write_bytes(target, b"old")
    monkeypatch.setattr(storage.os, "fsync", no_space)  # the bytes went to the temp file; flushing them fails
    with pytest.raises(DiskFullError) as caught:
        atomic_write_bytes(target, b"new" * 1000)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'store'}: no space left to write there (No space left on device")
    assert "free space there and rerun: the files completed before it are kept" in message
    assert len(message.splitlines()) == 1 and caught.value.directory == str(tmp_path / "store")
    assert visible(tmp_path / "store") == ["manifest.json"] and target.read_bytes() == b"old"
    monkeypatch.undo()
    atomic_write_bytes(target, b"new")  # space freed: the same write completes
    assert target.read_bytes() == b"new" and visible(tmp_path / "store") == ["manifest.json"]


def test_a_disk_full_error_survives_a_process_boundary():
    error = DiskFullError("/data/features", "No space left on device", "the files completed before it are kept")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.directory == "/data/features"


def test_errors_that_are_not_a_full_disk_pass_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error") as caught:
        atomic_write_bytes(tmp_path / "a.json", b"x")
    assert not isinstance(caught.value, DiskFullError) and visible(tmp_path) == []
    # torch's write failure has no errno: with plenty of space left it is not called a full disk.
    monkeypatch.setattr(storage, "free_bytes", lambda directory: 10 << 30)
    failed = RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                          "data/0: file write failed")
    assert storage.disk_full_error(failed, tmp_path) is None
    monkeypatch.setattr(storage, "free_bytes", lambda directory: 0)
    assert "(torch.save: file write failed, with 0 MiB free)" in str(storage.disk_full_error(failed, tmp_path))


def tiny_checkpoint_args():
    torch.manual_seed(0)
    aligner = Aligner(AlignerConfig(in_dim=6, out_dim=4))
    return {"aligner": aligner, "trainer_state": {"step": 4, "weights": torch.zeros(8)}, "meta": {"loss": 1.0},
            "keep_last": 3}


@pytest.mark.parametrize("failure", ["torch.save", "aligner write"])
def test_a_full_disk_while_checkpointing_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, failure):
    root = tmp_path / "run" / "checkpoints"
    ckpt.save_checkpoint(root, step=2, **tiny_checkpoint_args())
    before = visible(root)
    if failure == "torch.save":
        def full_save(obj, path, *args, **kwargs):
            path.write_bytes(b"PK\x03\x04 part of a state")  # what torch left before the write failed
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
        monkeypatch.setattr(ckpt.torch, "save", full_save)
        monkeypatch.setattr(storage, "free_bytes", lambda directory: 4096)  # what a full disk's statvfs reports
    else:
        monkeypatch.setattr(storage.os, "fsync", no_space)
    with pytest.raises(DiskFullError) as caught:
        ckpt.save_checkpoint(root, step=4, **tiny_checkpoint_args())
    message = str(caught.value)
    assert message.startswith(f"{root}: no space left to write there (") and len(message.splitlines()) == 1
    assert message.endswith("free space there and rerun: the checkpoints completed before it are kept, "
                            "and training resumes from the newest")
    assert visible(root) == before  # no half checkpoint, no temporary directory
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000002"]
    monkeypatch.undo()
    ckpt.save_checkpoint(root, step=4, **tiny_checkpoint_args())  # space freed: the same checkpoint is written
    assert ckpt.load_trainer_state(ckpt.latest_checkpoint(root))["step"] == 4


def test_a_full_disk_through_the_cli_is_one_line_naming_the_directory(tmp_path, monkeypatch, capsys):
    pth = tmp_path / "official.pth"
    layers = Aligner(AlignerConfig(in_dim=6, out_dim=4)).state_dict()
    torch.save({"model": {f"mm_projector.{i}.{k}": layers[f"{name}.{k}"] for i, name in ((0, "fc1"), (2, "fc2"))
                          for k in ("weight", "bias")} | {"mm_projector.3.weight": layers["norm.weight"]}}, pth)
    monkeypatch.setattr(storage.os, "fsync", no_space)
    assert main(["aligner", "import-official", str(pth), str(tmp_path / "out" / "aligner")]) == 2
    err = capsys.readouterr().err.strip()
    # The directory the operator frees space in, not the temporary one the aligner was written into.
    assert err.startswith(f"thinkdiff aligner: error: {tmp_path / 'out'}: no space left to write there")
    assert len(err.splitlines()) == 1 and not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("below", ["", "sub/dir"])
def test_a_paths_root_that_is_a_file_is_named_with_the_fix(make_cfg, tmp_path, capsys, below):
    (tmp_path / "root.txt").write_text("not a directory")
    root = tmp_path / "root.txt" / below if below else tmp_path / "root.txt"
    cfg = make_cfg(root=root)  # validation passes: the root need not exist yet
    problem = "is a file" if not below else f"is under {tmp_path / 'root.txt'}, a file"
    message = re.escape(f"paths.root='{root}' {problem}, not a directory: set ")
    for stage in ("corpus", "features", "train"):
        with pytest.raises(ConfigError, match=message):
            stage_dir(cfg, stage)
    with pytest.raises(ConfigError, match=message):  # the default MLflow store lies under it too
        tracking_uri(cfg)
    for command in (["corpus"], ["cobsat", "eval", "eval.generator=oracle"]):
        assert main([*command, "--config", "tiny", f"paths.root={root}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"error: paths.root='{root}' {problem}" in err
    assert (tmp_path / "root.txt").read_text() == "not a directory"


def test_a_paths_root_yet_to_be_made_is_accepted(make_cfg, tmp_path):
    cfg = make_cfg(root=tmp_path / "new" / "root")
    assert stage_dir(cfg, "corpus").parent == tmp_path / "new" / "root" / "corpus"
