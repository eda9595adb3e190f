"""One exception type for bad input, so the CLI can print one line and exit 2; one line out of a library's error."""

from __future__ import annotations

import re
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


def short_reason(exc: BaseException, path: str | PathLike | None = None) -> str:
    """One line out of a library exception (for a `VolsegError`'s problem), without the file name.

    SimpleITK's messages span several lines and name C++ source files: keep the ERROR line only,
    plus the innermost cause when that line ends in a colon (NRRD's "Error reading <file>:").
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if "ERROR:" in line]
    if errors:
        text = lines[errors[-1]].split("ERROR:", 1)[1].strip()
        text = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text)  # "MetaImageIO(0x55d9...): " says nothing
        if text.endswith(":") and errors[-1] + 1 < len(lines):
            text += " " + re.sub(r"^\[\w+\]\s*", "", lines[-1])  # "[nrrd] ...: expected 4004 bytes but ..."
    else:
        text = " ".join(lines) or type(exc).__name__
    if path is not None:
        for spelling in (f'"{path}"', f"'{path}'", str(path)):
            text = text.replace(spelling, "the file")
        text = text.replace("File the file", "the file")
    if len(text) > 200:
        text = text[:197] + "..."
    return text
