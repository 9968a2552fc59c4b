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


def require_utf8_text(path: str | Path) -> None:
    """Raise `TraceFormatError` (file, line, what to do) unless `path` holds UTF-8 text.

    Without this a binary or UTF-16 file fails deep inside a parser with a bare codec error that
    names neither the file nor the line.
    """
    data = Path(path).read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise TraceFormatError(
            path, 1, None, "the file is UTF-16 text; save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`)"
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise TraceFormatError(
            path, line, None, f"a NUL byte at byte {nul}: this is a binary or UTF-16 file, not a UTF-8 text trace"
        )
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TraceFormatError(
            path,
            line,
            None,
            f"byte 0x{data[exc.start]:02x} at byte {exc.start} is not UTF-8; save the trace as UTF-8 text",
        ) from None
