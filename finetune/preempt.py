"""Preemption signals: a handler that only sets a flag (`PreemptionFlag`), and the votes by which every rank
learns, at the same step boundary, whether any rank was asked to stop (`AsyncVote` per step without a host
sync; `PreemptionFlag.stop_now` where one blocking all-reduce is fine). A run stopped this way saves a
checkpoint and exits with `finetune.EXIT_PREEMPTED` (75)."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from . import distributed
from .config_checks import parse_signals


class PreemptionFlag:
    """Set by the handler of --preempt-signals (installed on construction); the loop polls it at step
    boundaries, and all ranks agree on stopping after the same step."""

    def __init__(self, names: str):
        self.requested = False
        self.signal_name = None
        for sig in parse_signals(names):
            signal.signal(sig, self._handler)

        self.stopping = False       # set by stop_now() / poll(): every rank agreed to stop
        self._vote = None           # AsyncVote of poll()

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def poll(self, device: torch.device) -> bool:
        """Per step, without blocking the host on the device: starts this step's vote and returns True on
        every rank -- at the same step -- once the vote of the previous step found a signal on any rank
        (AsyncVote). Call settle() after the last step."""
        if self._vote is None:
            self._vote = AsyncVote(device)
        self.stopping = self._vote.vote(self.requested) or self.stopping
        return self.stopping

    def settle(self) -> bool:
        """Wait for the vote still in flight (an epoch's last step); True if it found a signal."""
        if self._vote is not None:
            self.stopping = self._vote.settle() or self.stopping
        return self.stopping

    def stop_now(self, device: torch.device) -> bool:
        """True on every rank if any rank was asked to stop (one tiny all-reduce); remembered in .stopping."""
        self.stopping = self.stopping or distributed.any_rank(self.requested, device)
        return self.stopping


class AsyncVote:
    """'Did any rank get a preemption signal?' without blocking the host on the device every step.

    vote(flag) at step k starts an all-reduce (MAX) of this rank's flag (AsyncReduce) and returns the result
    of the vote started at step k-1 -- by then the device has long finished step k-1 while step k is already
    queued, so the host stays one step ahead. Every rank reads the same reduced value at the same step, so
    all ranks stop after the same step (one step after the signal was seen). settle() waits for the last
    vote (at an epoch's end)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reduce = distributed.AsyncReduce(device, dist.ReduceOp.MAX)

    def vote(self, flag: bool) -> bool:
        previous = self.settle()
        self._reduce.start(torch.full((1,), 1.0 if flag else 0.0, dtype=torch.float32, device=self.device))
        return previous

    def settle(self) -> bool:
        """The result of the vote in flight (False when none), waiting for it."""
        result = self._reduce.result()
        return bool(result and result[0] > 0)
