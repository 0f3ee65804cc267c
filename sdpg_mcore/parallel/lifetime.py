"""Child processes die with the trainer, even when it is killed with SIGKILL.

A trainer killed by ``kill -9`` (OOM killer, a scheduler, a user) runs no ``finally`` and no
``atexit``: without help its rollout servers, the SGLang router, the processes Megatron forks to
write checkpoint files and the ``Manager`` it spawns to collect their results live on, holding
memory, GPUs and ports. Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) asks the kernel to
signal a child when its parent dies:

- :func:`die_with_parent` as a ``subprocess.Popen(preexec_fn=...)`` for servers and the router;
- :func:`die_with` in a process whose parent is not the one it must die with: a rank forked by
  ``multiprocessing``'s fork server (``parallel/spawn.py``), whose parent, the server, leaves only
  once every child it forked has closed the pipe it watches — ranks included;
- :func:`kill_children_with_parent` once in the trainer: every child it *forks* (Megatron's
  checkpoint writers, ``fork`` multiprocessing) gets the signal through ``os.register_at_fork``,
  and every child it *spawns* (``spawn`` multiprocessing: Megatron's async-checkpoint ``Manager``,
  the ``--nproc`` ranks) through its command line, which first sets the signal, then checks that
  its parent is still the one that started it. A spawned child is started by ``fork_exec`` in C,
  which runs no Python fork hook: the command line is the one place where code of ours runs in it
  before the child's own.

The signal goes out when the *thread* that started the child exits, so children must be started from
a thread that outlives them (the trainer's main thread, ``RolloutServers``' launcher thread).
Elsewhere than Linux these are no-ops. Standard library only: ``rollout/sglang_entry/`` loads this
file by its path into SGLang's interpreter, so that SGLang's scheduler processes die with it too.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_LINUX = sys.platform.startswith("linux")
#: libc's symbols, resolved once here: nothing is loaded between fork and exec.
_LIBC = ctypes.CDLL(None, use_errno=True) if _LINUX else None
_installed = False
_parent: int | None = None


def _prctl_pdeathsig(sig: int) -> bool:
    return _LIBC is not None and _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a freshly forked child: be sent ``sig`` when the parent dies (or now, if it already has).

    Usable as ``preexec_fn``; touches only async-signal-safe calls (``prctl``, ``getppid``, ``kill``).
    """
    parent = _parent
    if _prctl_pdeathsig(sig) and parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)  # the parent died between fork and prctl


def die_with(pid: int, sig: int = signal.SIGKILL) -> None:
    """Be sent ``sig`` when process ``pid`` exits (at once if it already has): a daemon thread waits
    on its pidfd (Linux 5.3+), which turns readable when the process ends, reaped or not."""
    if not _LINUX:
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), sig)
        return
    threading.Thread(
        target=_kill_self_when_readable, args=(fd, sig), name=f"die-with-{pid}", daemon=True
    ).start()


def _kill_self_when_readable(fd: int, sig: int) -> None:
    select.select([fd], [], [])
    os.kill(os.getpid(), sig)


def preexec_die_with_parent():
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets SIGKILL when this process dies."""
    global _parent
    _parent = os.getpid()
    return die_with_parent


def kill_children_with_parent() -> None:
    """Make every child this process forks or spawns from now on die with it (idempotent)."""
    global _installed, _parent
    _parent = os.getpid()
    if _installed or not _LINUX:
        return
    _installed = True
    os.register_at_fork(before=_remember_parent, after_in_child=die_with_parent)
    _spawned_children_die_with_parent()


def _remember_parent() -> None:
    global _parent
    _parent = os.getpid()


def pdeathsig_prelude(parent_pid: int, sig: int = signal.SIGKILL) -> str:
    """Python source that makes the process running it die with ``parent_pid`` (exit at once if it
    already has): the first statements of a spawned child's ``-c`` program."""
    return (
        f"import ctypes,os;ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG},{int(sig)},0,0,0);"
        f"os.getppid()=={int(parent_pid)} or os._exit(1);"
    )


def _spawned_children_die_with_parent() -> None:
    """Prefix ``multiprocessing``'s spawn command line (``python -c 'from multiprocessing.spawn import
    spawn_main; ...'``) with :func:`pdeathsig_prelude` for the process that spawns."""
    from multiprocessing import spawn

    command_line = spawn.get_command_line
    if getattr(command_line, "dies_with_parent", False):
        return

    def get_command_line(**kwds):
        cmd = list(command_line(**kwds))
        if "-c" in cmd:  # a frozen executable takes no program; leave it alone
            program = cmd.index("-c") + 1
            cmd[program] = pdeathsig_prelude(os.getpid()) + cmd[program]
        return cmd

    get_command_line.dies_with_parent = True
    spawn.get_command_line = get_command_line
