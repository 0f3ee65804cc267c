"""Child processes die with the trainer, even when it is killed with SIGKILL.

A trainer killed by ``kill -9`` (OOM killer, a scheduler, a user) runs no ``finally`` and no
``atexit``: without help its rollout servers, the SGLang router and the processes Megatron forks
to write checkpoint files live on, holding memory, GPUs and ports. Linux's parent-death signal
(``prctl(PR_SET_PDEATHSIG)``) asks the kernel to signal a child when its parent dies:

- :func:`die_with_parent` as a ``subprocess.Popen(preexec_fn=...)`` for servers and the router;
- :func:`kill_forks_with_parent` once in the trainer: every child it forks (Megatron's checkpoint
  writers, ``fork`` multiprocessing) gets the signal too (``os.register_at_fork``).

The signal goes out when the *thread* that forked the child exits, so children must be started from
a thread that outlives them (the trainer's main thread). Elsewhere than Linux these are no-ops.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
#: libc's symbols, resolved once here: nothing is loaded between fork and exec.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
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


def preexec_die_with_parent():
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets SIGKILL when this process dies."""
    global _parent
    _parent = os.getpid()
    return die_with_parent


def kill_forks_with_parent() -> None:
    """Make every child this process forks from now on die with it (idempotent)."""
    global _installed, _parent
    _parent = os.getpid()
    if _installed or not sys.platform.startswith("linux"):
        return
    _installed = True
    os.register_at_fork(before=_remember_parent, after_in_child=die_with_parent)


def _remember_parent() -> None:
    global _parent
    _parent = os.getpid()
