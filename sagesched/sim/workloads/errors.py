"""The error a malformed trace file raises.

A trace is user data: when it is wrong, the user must be told exactly where, so the message always
names the file, the line and the column (field) at fault, in the `file:line: column X: ...` shape
that editors and terminals turn into a link.
"""

from __future__ import annotations

from pathlib import Path


class TraceFormatError(ValueError):
    """A trace file that cannot be parsed; `path`, `line` (1-based) and `column` say where."""

    def __init__(self, path: str | Path, line: int | None, column: str | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.column = column
        self.detail = message
        where = self.path if line is None else f"{self.path}:{line}"
        text = f"{where}: column {column}: {message}" if column else f"{where}: {message}"
        super().__init__(text)
