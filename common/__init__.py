"""The bottom floor, below data_prep and finetune: what every package and entry point shares.

- `common.errors`: the one usage-error type (`UsageError`) and the one exit-2 path (`cli_main`);
- `common.fsutil`: replacing a file or a folder atomically (`atomic_open`, `atomic_write_text`, ...);
- `common.extras`: optional packages (`require`, `check`: one line naming the extra when one is missing).

It imports only the standard library, and nothing above it (docs/architecture.md).
"""
