"""Writing files atomically: a crash never leaves a half-written file under the real name.

Every output volseg writes (volumes, tables, JSON, plots, whole dataset folders) goes to a
temporary sibling that is renamed onto the real name only when complete. The temporaries of
volumes and folders carry the writer's process id, so a later run can delete those of a killed
process (`remove_stale_temporaries`) without touching another live writer's.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from volseg.errors import VolsegError, short_reason


def create_folder_of(path: Path) -> None:
    """Create the folder an output goes into; failing that, one line naming the folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission, no space
        raise VolsegError(path.parent, f"cannot create the output folder: {exc.strerror or exc}") from None


def write_atomically(path: Path, ending: str, write: Any) -> None:
    """Call `write(temporary)` for a temporary sibling of `path` ending in `ending`, then rename it onto `path`.

    The temporary is `.<stem>.tmp-<pid><ending>` (so writers that choose the format by the ending
    still see it, and `remove_stale_temporaries` knows whose it is); a failed write removes it and
    an OS or library error becomes one `VolsegError` line naming `path`.
    """
    stem = path.name[: -len(ending)]
    temporary = path.parent / f".{stem}.tmp-{os.getpid()}{path.name[-len(ending):]}"
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, VolsegError):
            raise VolsegError(path, f"cannot write: {_write_reason(exc)}") from None
        raise


def _write_reason(exc: BaseException) -> str:
    """"No space left on device" rather than errno digits and the temporary file's name."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return short_reason(exc)


_TEMPORARY_NAME = re.compile(r"\..+\.tmp-(\d+)(\.[A-Za-z.]+)?")  # ours: `.<stem>.tmp-<pid><ending>`


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders `write_volume` left in `folder` when its process died.

    A process killed while writing (SIGKILL, power loss) cannot clean up; its temporaries carry its
    process id, so those of processes still running (another writer into the same folder) are kept.
    Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY_NAME.fullmatch(entry.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or cannot tell: leave its files alone
    return True


def write_detached_atomically(path: Path, write: Any) -> None:
    """.nhdr/.mhd name their data file after the header: write both into a temporary folder under
    their final names, then move the data file(s) first and the header last."""
    folder = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        folder.mkdir()
        write(folder / path.name)
        written = sorted(folder.iterdir(), key=lambda p: p.name == path.name)  # header last
        for file in written:
            os.replace(file, path.parent / file.name)
        folder.rmdir()
    except BaseException as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, VolsegError):
            raise VolsegError(path, f"cannot write: {_write_reason(exc)}") from None
        raise


@contextmanager
def folder_written_atomically(out: Path, subfolders: Sequence[str] = ()) -> Iterator[Path]:
    """A fresh temporary sibling folder to fill; it replaces `out` only if the block completes.

    A dataset written by volseg is therefore either the old one or the complete new one, never
    half of each; an interrupted or failed write leaves only `.<name>.tmp-<pid>`, which the
    block removes itself on errors.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for sub in subfolders:
            (tmp / sub).mkdir(parents=True)
        tmp.mkdir(parents=True, exist_ok=True)
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open ("w" or "wb") a temporary sibling of `path`; move it onto `path` only on success.

    Every table, JSON and plot volseg writes goes through here, so a crash never leaves a
    half-written file under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    text_kw = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    try:
        with open(tmp, mode.replace("w", "x"), **text_kw) as f:  # "x": never clobber a stray file
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a whole text file atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)
