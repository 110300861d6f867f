"""Covers: a failing `accelerate launch` surfaces as a clear error with the subprocess's own message,
and writes the resolved config the launch used; killing the process that launched training (SIGKILL)
leaves no launcher or worker running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thinkdiff.config import load_config
from thinkdiff.processes import PARENT_DEATH_SUPPORTED
from thinkdiff.train.launch import TrainingLaunchError, launch_training

pytestmark = pytest.mark.integration


def test_launch_failure_carries_the_reason(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}"])
    with pytest.raises(TrainingLaunchError) as err:
        launch_training(cfg, tmp_path / "no-features", tmp_path / "run")
    message = str(err.value)
    assert "training exited with" in message and "a rerun resumes" in message
    assert "no-features: no such directory" in message and "run `thinkdiff features`" in message
    assert "accelerate launch" not in message.split("Last output:")[1]  # no warning about defaults it chose
    assert load_config(tmp_path / "run" / "config.yaml").to_dict() == cfg.to_dict()


SLEEPER = "import os, sys, time\nopen(os.path.join(sys.argv[1], str(os.getpid())), 'w').close()\ntime.sleep(300)\n"
PARENT = ("import os, sys\nfrom thinkdiff.config import load_config\n"
          "from thinkdiff.train.launch import launcher_flags, run_launcher\n"
          "kind, script, pids = sys.argv[1:]\n"
          "launcher = ([sys.executable, '-m', 'accelerate.commands.launch', *launcher_flags(load_config('tiny').train)]"
          " if kind == 'accelerate' else [sys.executable, '-m', 'torch.distributed.run', '--standalone',"
          " '--nproc_per_node', '2'])\n"
          "run_launcher([*launcher, script, pids], dict(os.environ))\n")


def _descendants(root: int) -> set[int]:
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            children = {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
            todo.extend(children - found)
            found |= children
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not PARENT_DEATH_SUPPORTED, reason="the parent-death signal is Linux's (prctl)")
@pytest.mark.parametrize("kind, workers", [("accelerate", 1), ("torchrun", 2)])
def test_a_killed_parent_leaves_no_launcher_or_worker(tmp_path, kind, workers):
    """`kill -9` of the process running `accelerate launch` (the CPU launcher, and torchrun's elastic agent
    as `accelerate launch --multi_gpu` runs it, whose workers have sessions of their own) ends the launcher
    and every worker."""
    script, pids = tmp_path / "sleeper.py", tmp_path / "pids"
    script.write_text(SLEEPER)
    pids.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", PARENT, kind, str(script), str(pids)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < workers:
            assert time.monotonic() < deadline and parent.poll() is None, "the workers never started"
            time.sleep(0.1)
        tree = _descendants(parent.pid)
        assert {int(p.name) for p in pids.iterdir()} <= tree
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 15
        while any(map(_alive, tree)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in tree if _alive(p)], "the launcher or a worker outlived the process that started it"
    finally:
        parent.kill()
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


LINGERER = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(3), sys.exit(0)))\n"
            "open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close()\ntime.sleep(300)\n")
HOLDER = ("import os, sys\nfrom pathlib import Path\nfrom thinkdiff.train.launch import run_launcher\n"
          "from thinkdiff.train.loop import hold_run_directory\nrun_dir, script, pids = sys.argv[1:]\n"
          "with hold_run_directory(Path(run_dir)) as fd:\n"
          "    run_launcher([sys.executable, script, pids], dict(os.environ), pass_fds=(fd,))\n")


@pytest.mark.skipif(not PARENT_DEATH_SUPPORTED, reason="the parent-death signal is Linux's (prctl)")
def test_the_run_lock_outlives_a_killed_parent_until_its_launcher_has_ended(tmp_path):
    """The process that launched training is killed; its launcher takes a few seconds to stop. Until it
    has, the run directory stays locked: a second training cannot start beside its last writes."""
    from thinkdiff.storage import exclusive
    from thinkdiff.train.loop import run_lock_path

    run_dir, script, pids = tmp_path / "run", tmp_path / "lingerer.py", tmp_path / "pids"
    script.write_text(LINGERER)
    pids.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(script), str(pids)])
    try:
        deadline = time.monotonic() + 60
        while not list(pids.iterdir()):
            assert time.monotonic() < deadline and parent.poll() is None, "the launcher never started"
            time.sleep(0.1)
        (launcher,) = [int(p.name) for p in pids.iterdir()]
        parent.kill()
        parent.wait()
        with exclusive(run_lock_path(run_dir), "", wait=False) as held:
            assert held is None and _alive(launcher)  # still locked while the launcher stops
        deadline = time.monotonic() + 20
        while _alive(launcher) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # its supervisor ends right after it
        with exclusive(run_lock_path(run_dir), "", wait=False) as held:
            assert held is not None and not _alive(launcher)
    finally:
        parent.kill()
