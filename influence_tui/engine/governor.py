"""How many threads a CPU decode step gets (no torch here: the torch-free model uses it too)."""

from __future__ import annotations

import math
import os


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def capped_threads(n: int | None) -> int | None:
    """A requested thread count, at most one per usable CPU: the kernel's threads meet at spinning
    barriers each phase, and a thread without a CPU makes every other wait for its time slice (on
    2 CPUs, 3 threads ran 3x slower than 2, 8 threads 13x; 1024 never finished)."""
    return None if not n else max(1, min(int(n), usable_cpus()))


class ThreadGovernor:
    """Picks the thread count of decode steps on CPU: all threads, or one while the CPU is contended.

    A decode step runs ~120 small parallel regions; when another process takes a core, each
    region's barrier waits for a descheduled thread (a scheduler time slice), and a step with 2
    threads becomes 10-100x slower than with 1 (measured: 850 ms vs 35 ms a token on a 2-core
    machine at load 3). The governor watches step times at full threads; after three steps in a row
    that take over three times the recent best it drops to one thread, then probes full threads
    again after 8, 16, ... 256 steps, keeping them when they beat the one-thread time. Short bursts
    are not contention: the app redrawing a streaming answer (~10 ms, ten times a second) made a
    step or two 2x slower, and at "two steps over 2x" a third to a half of an answer's steps ran
    on one thread, which is slower than two even then.
    """

    SLOW, STRIKES = 3.0, 3

    def __init__(self) -> None:
        self.full = 0  # the caller's thread count
        self.cur = 0
        self.best = math.inf  # recent best step time at full threads (drifts up 0.1% a step)
        self.strikes = 0
        self.single_time = math.inf  # moving average of one-thread steps
        self.backoff = 8
        self.countdown = 0
        self.probe: list[float] = []
        self.probing = False

    def threads(self, n: int) -> int:
        """The thread count for the next step, given the caller's count `n`."""
        if n != self.full:  # first use, or the caller changed it: follow
            self.full = self.cur = n
            self.best, self.strikes, self.probe, self.probing = math.inf, 0, [], False
        return self.cur

    def record(self, dt: float) -> None:
        """The time of the step just run with `cur` threads."""
        if self.full <= 1:
            return
        if self.cur == self.full:
            if self.probing:
                self.probe.append(dt)
                if len(self.probe) >= 2:
                    if min(self.probe) < 0.9 * self.single_time:
                        self.backoff, self.best = 8, min(self.probe)
                    else:
                        self.backoff = min(self.backoff * 2, 256)
                        self._single()
                    self.probe, self.probing = [], False
                return
            self.best = min(dt, self.best * 1.001)
            self.strikes = self.strikes + 1 if dt > self.SLOW * self.best else 0
            if self.strikes >= self.STRIKES:
                self._single()
        else:
            self.single_time = dt if self.single_time == math.inf else 0.8 * self.single_time + 0.2 * dt
            self.countdown -= 1
            if self.countdown <= 0:  # probe full threads again
                self.cur, self.probe, self.strikes, self.probing = self.full, [], 0, True

    def _single(self) -> None:
        self.cur, self.strikes, self.countdown = 1, 0, self.backoff
