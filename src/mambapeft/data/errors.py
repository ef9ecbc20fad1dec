"""The one exception type for bad input data.

Every loader in `mambapeft.data` raises `DataError` when a file is missing, malformed or
inconsistent. The message always names the file (and the line or record where there is one)
and says how to fix it, so the CLI can print it as-is instead of a traceback.
"""


class DataError(Exception):
    """Bad or missing input data; the message names the file and the fix."""


def where(path, line: int | None = None) -> str:
    """`path` or `path:line`, the prefix of every DataError message that points into a file."""
    return f"{path}:{line}" if line is not None else str(path)
