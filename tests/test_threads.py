"""align's thread choice (align/threads.py): the CPUs this process may use, minus those another
process keeps busy, with passive OpenMP waiting when it shares them; the user's OMP_NUM_THREADS
always wins."""

from __future__ import annotations

import os
import subprocess
import sys

from align import threads
from conftest import REPO

CONFIGURE = "from align import threads; n = threads.configure(); import os; print(n, os.environ.get('OMP_WAIT_POLICY', '-'))"


def _configure(env: dict) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", CONFIGURE], env={**clean, **env}, cwd=REPO, capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


def test_threads_for_the_free_cpus():
    assert threads.choose_threads(2, 0.0) == 2
    assert threads.choose_threads(2, 0.5) == 2  # a half-busy core still counts as free
    assert threads.choose_threads(2, 0.9) == 1
    assert threads.choose_threads(2, 3.0) == 1  # never fewer than one
    assert threads.choose_threads(8, 2.2) == 6


def test_user_setting_wins():
    assert _configure({"OMP_NUM_THREADS": "3"}) == ["3", "-"]
    assert _configure({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}) == ["1", "ACTIVE"]


def test_a_busy_process_leaves_its_cpu_out():
    cpus = threads.available_cpus()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        chosen, policy = _configure({})
    finally:
        busy.kill()
    assert 1 <= int(chosen) <= max(1, cpus - 1)
    assert policy == ("PASSIVE" if cpus > 1 else "-")  # sharing: waiting threads sleep
