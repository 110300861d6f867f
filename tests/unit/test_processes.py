"""Covers: a child started with `thinkdiff.processes.spawn` ends with its parent, grandchildren and a
child that ignores SIGTERM included, whether the parent is SIGKILLed or SIGTERMed; a child's exit
code (or the signal it died of) reaches the parent unchanged."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thinkdiff.processes import PARENT_DEATH_SUPPORTED, spawn

pytestmark = pytest.mark.skipif(not PARENT_DEATH_SUPPORTED, reason="the parent-death signal is Linux's (prctl)")

# A child that starts a grandchild which ignores SIGTERM (so only the supervisor's SIGKILL ends it),
# writes both pids and sleeps.
CHILD = ("import subprocess, sys, time\n"
         "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
         "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])\n"
         "open(sys.argv[1], 'w').write(f'{g.pid}')\n"
         "time.sleep(300)\n")
PARENT = ("import sys, time\nfrom thinkdiff.processes import spawn\n"
          "child = spawn([sys.executable, '-c', sys.argv[1], sys.argv[2]], grace_s=1.0)\n"
          "print(child.pid, flush=True)\ntime.sleep(300)\n")


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (dead) parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_dead_parents_children_and_grandchildren_end(tmp_path, sig):
    pid_file = tmp_path / "grandchild.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(pid_file)], stdout=subprocess.PIPE, text=True)
    tree: set[int] = set()
    try:
        supervisor = int(parent.stdout.readline())
        deadline = time.monotonic() + 20
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the grandchild never started"
            time.sleep(0.05)
        tree = {supervisor, int(pid_file.read_text())} | {
            int(p) for p in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()}
        assert len(tree) == 3 and all(alive(p) for p in tree)
        parent.send_signal(sig)
        parent.wait(timeout=10)
        assert wait_gone(tree, timeout_s=10) == set(), "processes outlived their parent"
    finally:
        parent.kill()
        parent.wait()
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_exit_code_and_the_signal_of_the_command_pass_through():
    exited = spawn([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert exited.wait(timeout=20) == 3
    killed = spawn([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.wait(timeout=20) == -signal.SIGKILL
