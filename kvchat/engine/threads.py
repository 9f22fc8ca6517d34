"""How many torch threads a step uses: every core while the others are idle, fewer while they are busy.

A decode step is hundreds of short ops; an OpenMP team that spins between them keeps two cores
working together (measured on this project's 2-core machine, batch 4 at 2k tokens, bfloat16: 71 tok/s
with two spinning threads, 44 with one). When another process keeps a core busy, the same team waits
at every op for a thread the scheduler took away (4.5 tok/s at batch 1, against 17 with one thread).
So the engine looks at the machine's other load every half second (from /proc/stat, minus this
process's own time) and uses the cores that are free, never more than torch was given
(`torch.set_num_threads`, OMP_NUM_THREADS or Ray's --worker-cpus). Where /proc is not there, it
keeps every thread. KVCHAT_ADAPTIVE_THREADS=0 turns it off (the test suite does: results compared
across runs should not depend on what else the machine was doing).
"""

from __future__ import annotations

import os
import time

import torch

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def choose(max_threads: int, cores: int, others_busy: float) -> int:
    """Threads for the next steps: the cores other processes leave free (rounded), 1 to max_threads."""
    free = cores - others_busy
    return max(1, min(max_threads, int(free + 0.5)))


def cpu_sample() -> tuple[float, float] | None:
    """(busy seconds of the whole machine, seconds of this process) so far, or None without /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / _TICK, (int(own[11]) + int(own[12])) / _TICK  # utime + stime


class Threads:
    def __init__(self, max_threads: int | None = None, interval: float = 0.5, sample=cpu_sample,
                 clock=time.monotonic, cores: int | None = None):
        self.max = max_threads or torch.get_num_threads()
        self.cores = cores or os.cpu_count() or 1
        self.interval, self.sample, self.clock = interval, sample, clock
        self.last = None  # (time, machine busy s, own s)
        self.current = self.max

    def before_step(self) -> int:
        """Call before a step; -> the threads it runs with."""
        have = torch.get_num_threads()
        if have != self.current:  # someone else set the threads since: that is the new ceiling
            self.max = self.current = have
        if self.max <= 1:
            return 1
        now = self.clock()
        if self.last is not None and now - self.last[0] < self.interval:
            return self.current
        s = self.sample()
        if s is None:
            return self.current
        if self.last is not None and now - self.last[0] > 4 * self.interval:
            # Idle for a while (between requests, or while another program ran): what happened then
            # says nothing about now. Start again from every thread and look at the next interval.
            self.last = None
            if self.current != self.max:
                torch.set_num_threads(self.max)
                self.current = self.max
        if self.last is not None:
            dt = now - self.last[0]
            others = max(0.0, (s[0] - self.last[1]) - (s[1] - self.last[2])) / max(dt, 1e-6)
            n = choose(self.max, self.cores, others)
            if n != self.current:
                torch.set_num_threads(n)
                self.current = n
        self.last = (now, *s)
        return self.current


_SHARED: Threads | None = None


def shared() -> Threads | None:
    """One policy per process: every engine's steps share the machine the same way."""
    global _SHARED
    if os.environ.get("KVCHAT_ADAPTIVE_THREADS", "1") == "0":
        return None
    if _SHARED is None:
        _SHARED = Threads()
    return _SHARED
