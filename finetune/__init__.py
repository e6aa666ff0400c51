"""Library code behind train.py: one module per concern (config, data, model, loop, checkpoint, monitor)."""

import os

# The project's one usage-error type and exit-2 path live in common (the bottom floor); the library re-exports
# them for its many users (`from . import UsageError`; finetune.export's and finetune.config's cli_main).
from common.errors import UsageError, cli_main
# The one atomic write (an exclusive, unpredictable temporary name: no planted symlink is followed).
from common.fsutil import atomic_write_text

__version__ = "0.1.0"


def simulated_delay(variable: str) -> None:
    """Sleep for the seconds in the environment `variable`, if set: tests simulate slow steps with it
    (FINETUNE_TEST_SAVE_DELAY_S: a slow checkpoint write; FINETUNE_TEST_STARTUP_DELAY_S: a slow start-up)."""
    delay = float(os.environ.get(variable, "0") or 0)
    if delay:
        import time
        time.sleep(delay)


__all__ = ["EXIT_PREEMPTED", "UsageError", "atomic_write_text", "cli_main", "simulated_delay"]

# Exit code of a run that was asked to stop (preemption signal) and saved a checkpoint to resume from.
# 75 is EX_TEMPFAIL from sysexits.h: "temporary failure, try again" -- slurm/finetune.sh requeues on it.
EXIT_PREEMPTED = 75
