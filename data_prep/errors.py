"""The one exception type for user-facing errors.

`data_prep.main` turns a `DataPrepError` into a single `data_prep: error: ...` line on stderr and
exit status 2; anything else is a bug and keeps its traceback.
"""


class DataPrepError(Exception):
    """A problem the user can fix (bad flag, missing folder, unreadable input...).

    The message must name the file or flag involved and say what to do about it.
    """
