"""Child processes that end with the process that started them, whatever ends it (SIGKILL included).

A child of a killed process is re-parented, not stopped: `docker stop`, systemd or a Prefect
cancellation that SIGTERMs or SIGKILLs `thinkdiff corpus` would leave img2dataset (and its worker
pool) downloading on its own, and `accelerate launch` training on its own. Linux can signal a
process when its parent dies (PR_SET_PDEATHSIG, man 2 prctl), but that setting reaches only the
process that sets it: it is cleared in the children of a fork(2), so img2dataset's spawned pool and
accelerate's workers would still outlive their parent. So `spawn` starts the command under a small
supervisor (`python -m thinkdiff.processes`), in a process group of its own:

- the supervisor asks for SIGTERM when its parent dies, then starts the command in its group;
- on SIGTERM, SIGINT or SIGHUP (the parent's death included) it sends SIGTERM to the group, waits
  up to `grace_s` for the command to exit (torchrun's elastic agent stops its workers, which run in
  sessions of their own, when it gets SIGTERM), then SIGKILLs what is left of the group, itself last;
- when the command exits, the group's leftovers get SIGTERM and the supervisor exits as the command
  did (the same code, or the same signal).

The supervisor runs no code of ours between fork and exec: `preexec_fn`, the other way to call
prctl in the child, is documented as unsafe in a process with threads (Prefect runs tasks in
threads; https://docs.python.org/3/library/subprocess.html#subprocess.Popen).

The parent-death signal fires when the *thread* that started the child ends (man 2 prctl), so call
`spawn` from the thread that waits for the child. Elsewhere than Linux there is no such signal:
`spawn` still gives the command a process group of its own, so `stop_process_group` ends the whole
tree, but a killed parent leaves its children running.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PARENT_DEATH_SUPPORTED = sys.platform.startswith("linux")


def spawn(command: Sequence[str], *, grace_s: float = 10.0, **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen(command, **popen_kwargs)` in a process group of its own whose every process
    ends when this one does (see the module docstring); the Popen's pid is the group's.

    `grace_s`: how long the command has, after SIGTERM, to stop its own children before the group
    is SIGKILLed.
    """
    if PARENT_DEATH_SUPPORTED:
        command = [sys.executable, "-m", "thinkdiff.processes", str(os.getpid()), str(grace_s), "--", *command]
    else:
        log.debug("%s has no parent-death signal (a Linux prctl): if this process is killed, %s keeps running",
                  sys.platform, command[0])
    return subprocess.Popen(command, start_new_session=True, **popen_kwargs)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the process and everything it started; SIGKILL to what is left after `grace_s`."""
    def signal_group(sig: int) -> bool:
        try:
            os.killpg(proc.pid, sig)
            return True
        except ProcessLookupError:
            return False

    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reaps the leader, which would otherwise keep the group alive as a zombie
        if not signal_group(0):
            break
        time.sleep(0.1)
    signal_group(signal.SIGKILL)
    proc.wait()


def set_parent_death_signal(sig: int) -> None:
    """Have the kernel send `sig` to this process when the thread that started it ends (man 2 prctl)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def _supervise(parent_pid: int, grace_s: float, command: list[str]) -> int:
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect: no signal will come
        return 128 + signal.SIGTERM
    stopping: list[int] = []

    def stop(signum: int, frame: object) -> None:
        if not stopping:
            stopping.append(signum)
            raise _Stop

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    child = None
    try:
        child = subprocess.Popen(command)  # in our group: our stdout, stderr and environment
        returncode = child.wait()
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    except _Stop:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # the group's SIGTERM reaches us too
        os.killpg(0, signal.SIGTERM)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=grace_s)
        os.killpg(0, signal.SIGKILL)  # what ignored SIGTERM or outlived the grace, this supervisor included
        raise AssertionError("unreachable: SIGKILL was sent to our own group") from None
    os.killpg(0, signal.SIGTERM)  # what the command left behind in its group
    if returncode < 0:  # die of the same signal, so the parent sees what the command saw
        with contextlib.suppress(OSError):  # SIGKILL and SIGSTOP have no handler to reset
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    return returncode


class _Stop(BaseException):
    """Raised in the supervisor by a stop signal."""


if __name__ == "__main__":
    _parent, _grace, _dash, *_command = sys.argv[1:]
    sys.exit(_supervise(int(_parent), float(_grace), _command))
