"""PreemptionFlag in one process (no process group): a signal sets `requested` at once; poll() reports it one
step later (the vote of the previous step is read), and stop_now() at once."""

import os
import signal

import torch

from finetune.preempt import PreemptionFlag


def test_a_signal_is_seen_by_poll_one_step_later_and_by_stop_now():
    old = signal.getsignal(signal.SIGUSR1)
    try:
        flag = PreemptionFlag("USR1")
        cpu = torch.device("cpu")
        assert flag.poll(cpu) is False and flag.stop_now(cpu) is False
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.signal_name == "SIGUSR1"
        seen = [flag.poll(cpu) for _ in range(3)]
        assert seen[-1] is True and seen == sorted(seen), seen        # once True, it stays True
        assert PreemptionFlag("USR1").stop_now(cpu) is False           # a fresh flag: nothing requested
        other = PreemptionFlag("USR1")
        os.kill(os.getpid(), signal.SIGUSR1)
        assert other.stop_now(cpu) is True and other.stopping
    finally:
        signal.signal(signal.SIGUSR1, old)
