"""Children die with their parent, even when it is killed with SIGKILL (parent-death signal): those it
starts with ``subprocess``, those it forks, and those it spawns (Megatron's async-checkpoint
``Manager`` is a ``spawn``-context one; a spawned child runs no Python fork hook)."""

import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import multiprocessing as mp, subprocess, sys, time
from sdpg_mcore.parallel.lifetime import kill_children_with_parent, preexec_die_with_parent
if __name__ == "__main__":
    kill_children_with_parent()
    server = subprocess.Popen(["sleep", "300"], preexec_fn=preexec_die_with_parent(), start_new_session=True)
    writer = mp.get_context("fork").Process(target=time.sleep, args=(300,))  # as Megatron's checkpoint writers
    writer.start()
    manager = mp.get_context("spawn").Manager()  # as Megatron's async writer's results queue
    queue = manager.Queue()
    spawned = mp.get_context("spawn").Process(target=time.sleep, args=(300,))
    spawned.start()
    print(server.pid, writer.pid, manager._process.pid, spawned.pid, flush=True)
    time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_popen_forked_and_spawned_children_die_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(CHILD)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in parent.stdout.readline().split()]
    assert len(pids) == 4 and all(_alive(p) for p in pids)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5  # the bound: nothing alive 5 s after the kill
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    survivors = [p for p in pids if _alive(p)]
    for pid in survivors:
        os.kill(pid, 9)
    assert not survivors
