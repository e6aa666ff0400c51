"""The fast tier's guard (tests/conftest.py): a test not marked slow cannot start a process, whichever way it
tries, and is told to mark itself slow; a slow test can."""

import multiprocessing
import os
import subprocess
import sys

import pytest

from conftest import ProcessStartInFastTest

HINT = "Mark it @pytest.mark.slow"


def _noop(*_):
    pass


def test_subprocess_is_refused_with_the_hint():
    with pytest.raises(ProcessStartInFastTest, match="subprocess.Popen.*" + HINT):
        subprocess.run([sys.executable, "-c", "pass"])
    with pytest.raises(ProcessStartInFastTest, match=HINT):
        subprocess.check_output(["true"])
    with pytest.raises(ProcessStartInFastTest, match=HINT):
        os.popen("true")
    with pytest.raises(ProcessStartInFastTest, match=HINT):
        os.system("true")


def test_fork_and_multiprocessing_are_refused():
    with pytest.raises(ProcessStartInFastTest, match="os.fork.*" + HINT):
        if os.fork() == 0:    # only if the guard failed: the child leaves at once
            os._exit(0)
    for method in ("fork", "spawn"):
        with pytest.raises(ProcessStartInFastTest, match="multiprocessing.*" + HINT):
            multiprocessing.get_context(method).Process(target=_noop).start()


def test_torch_multiprocessing_spawn_is_refused():
    import torch.multiprocessing as tmp
    with pytest.raises(ProcessStartInFastTest, match=HINT):
        tmp.spawn(_noop, nprocs=1)


def test_dataloader_workers_are_refused():
    import torch
    loader = torch.utils.data.DataLoader(list(range(4)), num_workers=1)
    with pytest.raises(ProcessStartInFastTest, match=HINT):
        next(iter(loader))


@pytest.mark.slow
def test_a_slow_test_may_start_a_process():
    assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout == "42\n"
