"""Fault injection for train.py subprocesses (tests/faults/sitecustomize.py says what each variable does).

    run_train(args, env=faults.env(FINETUNE_TEST_SAVE_DELAY_S=2))

`env` returns the variables plus a PYTHONPATH that puts this folder first, so that every Python process of the
run imports its sitecustomize.py.
"""

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def env(**variables) -> dict:
    """The environment additions for a train.py subprocess with these faults (values: seconds, or RANK:STEP)."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **{name: str(value) for name, value in variables.items()}}
