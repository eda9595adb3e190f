"""One exception type for bad input, so the CLI can print one line and exit 2."""

from __future__ import annotations

from os import PathLike


class VolsegError(Exception):
    """Bad input or a refused action: names the file, the problem and, when known, the fix.

    Raised at the boundaries (file readers, config parsing, CLI argument checks); anything else
    that escapes is a bug and keeps its traceback.
    """

    def __init__(self, path: str | PathLike | None, problem: str, hint: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        self.hint = hint
        super().__init__(self.message)

    def __reduce__(self) -> tuple:
        # keep the error intact across process pools (default pickling passes only the message)
        return (type(self), (self.path, self.problem, self.hint))

    @property
    def message(self) -> str:
        text = f"{self.path}: {self.problem}" if self.path else self.problem
        return f"{text} ({self.hint})" if self.hint else text
