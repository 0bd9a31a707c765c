"""How many CPU threads a run uses, chosen before torch starts its thread pool.

On a shared CPU, torch's default (one OpenMP thread per core, spinning while it waits for the
others) falls off a cliff: when another CPU-bound process holds one of the cores, every parallel
operation waits for the thread that is not running, and the spinning threads burn the time the
busy core needs. Measured here on 2 cores: SFT ran 9x slower beside one busy process.

align therefore
* counts the CPUs this process may actually use (its affinity mask and cgroup quota, not the
  machine's cores);
* leaves out the CPUs that other processes keep busy right now (sampled from /proc/stat for a
  quarter of a second as align starts), so a run beside a busy process uses the cores that are free;
* when it shares the machine so, lets OpenMP threads sleep instead of spin while they wait
  (`OMP_WAIT_POLICY=PASSIVE`). Not on an idle machine: there the wake-up latency of sleeping
  threads made SFT on the quickstart's model 1.44x slower than torch's spinning default
  (bench/threads_under_load.py).

Override: `OMP_NUM_THREADS` (and `OMP_WAIT_POLICY`) set by the user are kept as they are.
"""

from __future__ import annotations

import math
import os
import time


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def busy_cpus(seconds: float = 0.25) -> float:
    """CPUs kept busy by other processes now: the machine's non-idle CPU time over `seconds`
    while this process sleeps (0 when /proc/stat cannot be read)."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    elapsed = total1 - total0
    return (os.cpu_count() or 1) * (elapsed - (idle1 - idle0)) / elapsed if elapsed > 0 else 0.0


def choose_threads(cpus: int, busy: float) -> int:
    """Threads for the CPUs left free by `busy` others, at least one. A CPU counts as busy
    when at least 0.75 of it is in use: short bursts (an editor, a shell) do not cost a thread."""
    return max(1, min(cpus, cpus - math.floor(busy + 0.25)))


def configure() -> int:
    """Set the thread environment for this process (before torch is imported); returns the
    thread count chosen (or the user's)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else 0
    cpus = available_cpus()
    threads = choose_threads(cpus, busy_cpus())
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if threads < cpus:  # other processes hold CPUs: a spinning thread would take time they need
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return threads
