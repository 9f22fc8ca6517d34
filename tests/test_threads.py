"""The decode thread policy: every core while the others are idle, fewer while other processes are busy."""

from __future__ import annotations

import torch

from kvchat.engine.threads import Threads, choose, cpu_sample


def test_threads_follow_the_cores_other_processes_leave_free():
    assert choose(2, 2, 0.0) == 2
    assert choose(2, 2, 0.4) == 2
    assert choose(2, 2, 0.6) == 1
    assert choose(2, 2, 2.0) == 1  # never fewer than one
    assert choose(4, 8, 0.0) == 4  # never more than torch was given
    assert choose(8, 8, 3.2) == 5


class FakeMachine:
    """A clock and /proc readings: `others` cores busy besides this process, which uses `own`."""

    def __init__(self):
        self.t, self.busy, self.own, self.others = 0.0, 0.0, 0.0, 0.0

    def advance(self, dt, own=1.0):
        self.t += dt
        self.own += own * dt
        self.busy += (own + self.others) * dt

    def sample(self):
        return self.busy, self.own


def test_the_policy_backs_off_while_another_process_is_busy_and_returns(monkeypatch):
    m = FakeMachine()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        th = Threads(interval=0.5, sample=m.sample, clock=lambda: m.t, cores=2)
        assert th.before_step() == 2
        m.others = 1.0  # a busy process appears
        m.advance(0.2)
        assert th.before_step() == 2  # not looked at again within the interval
        m.advance(0.4)
        assert th.before_step() == 1 and torch.get_num_threads() == 1
        m.others = 0.0
        m.advance(0.6)
        assert th.before_step() == 2 and torch.get_num_threads() == 2
        m.others = 1.0
        m.advance(0.6)
        assert th.before_step() == 1
        m.advance(5.0, own=0.0)  # a long pause (another program ran, busy): not held against the next steps
        assert th.before_step() == 2
        torch.set_num_threads(1)  # the caller lowered the ceiling itself: the policy keeps to it
        m.advance(0.6)
        assert th.before_step() == 1
    finally:
        torch.set_num_threads(before)


def test_the_machine_sample_reads_proc_or_says_it_cannot():
    s = cpu_sample()
    assert s is None or (s[0] >= s[1] >= 0)
