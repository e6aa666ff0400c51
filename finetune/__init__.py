"""Library code behind train.py: one module per concern (config, data, model, loop, checkpoint, monitor)."""

# The project's one usage-error type and exit-2 path live in common (the bottom floor); the library re-exports
# them for its many users (`from . import UsageError`; finetune.export's and finetune.config's cli_main).
from common.errors import UsageError, cli_main
# The one atomic write (an exclusive, unpredictable temporary name: no planted symlink is followed).
from common.fsutil import atomic_write_text

__version__ = "0.1.0"

__all__ = ["EXIT_PREEMPTED", "UsageError", "atomic_write_text", "cli_main"]

# Exit code of a run that was asked to stop (preemption signal) and saved a checkpoint to resume from.
# 75 is EX_TEMPFAIL from sysexits.h: "temporary failure, try again" -- slurm/finetune.sh requeues on it.
EXIT_PREEMPTED = 75
