"""Fault handling shared by the stages: failure records of per-slide jobs, corrupt intermediates.

Failure record (``results/{slide}/FAILED.json``): when a per-slide stage run with
``wsiscan --failure-record PATH <stage> ...`` fails, it writes ``{"slide_id", "stage", "error",
"cause", "time", "wsiscan_version"}`` to ``PATH`` atomically; when a stage run with the same
``PATH`` succeeds, it removes the record. The record lies outside Snakemake's outputs, so it
survives the failed job. The workflow's default target then asks for the output of the stage
that failed (so the stage is retried even where older files of the slide still exist), and with
``evaluate.allow_missing`` the evaluation leaves out the slides that have one
(:func:`failed_slides`) and lists them in ``metrics.json``.

HDF5 attributes are read back as plain Python values by :func:`h5_attrs` (every stage's reader).

HDF5 outputs (:func:`atomic_h5`) are written to ``<name>.tmp`` through a guarded file object and
renamed when complete: a failed write (disk full, file too large, I/O error) raises
:class:`OutputWriteError` and leaves neither the output nor the ``.tmp`` behind.

Corrupt intermediates: a stage that finds one of the workflow's own HDF5 intermediates
(``rois.h5``, ``tiles.h5``, ``probmap.h5``) unreadable moves it aside to ``<name>.corrupt``
(:func:`quarantine`) and fails with a message saying so; the next run regenerates it with the
stage that produced it (the file is missing and the failed stage's output is a target).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import __version__
from .errors import SlideError

log = logging.getLogger(__name__)

FAILURE_RECORD_NAME = "FAILED.json"
CORRUPT_SUFFIX = ".corrupt"


def failure_record_path(results_dir: str | Path, slide_id: str) -> Path:
    """``<results_dir>/<slide_id>/FAILED.json``."""
    return Path(results_dir) / slide_id / FAILURE_RECORD_NAME


def write_failure_record(
    path: str | Path, *, stage: str, slide_id: str | None, cause: str, error: str
) -> None:
    """Write the failure record of ``stage`` to ``path`` (``<path>.tmp``, then ``os.replace``)."""
    path = Path(path)
    record = {
        "slide_id": slide_id,
        "stage": stage,
        "error": error,
        "cause": cause,
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "wsiscan_version": __version__,
    }
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def clear_failure_record(path: str | Path) -> bool:
    """Remove the record at ``path``; True when there was one."""
    try:
        Path(path).unlink()
    except FileNotFoundError:
        return False
    return True


def read_failure_record(path: str | Path) -> dict[str, Any] | None:
    """The record at ``path`` as a dict, or None when there is none (or it is unreadable)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def failed_slides(
    results_dir: str | Path, slide_inputs: Mapping[str, Iterable[str | Path]]
) -> dict[str, dict[str, Any]]:
    """Slides of ``slide_inputs`` (``{slide_id: its input files}``) that failed and were not fixed.

    A slide counts as failed while its record exists and is newer than each of its input files
    that exists (slide file, annotation): replacing a broken slide file makes the record stale,
    so the slide is scanned and evaluated again. Returns ``{slide_id: record}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for sid, inputs in slide_inputs.items():
        path = failure_record_path(results_dir, sid)
        try:
            recorded = path.stat().st_mtime_ns
        except FileNotFoundError:
            continue
        newer = []
        for item in inputs:
            try:
                newer.append(Path(item).stat().st_mtime_ns > recorded)
            except OSError:
                continue
        if any(newer):
            continue
        out[sid] = read_failure_record(path) or {"slide_id": sid, "cause": "unreadable record"}
    return out


def describe_failure(record: Mapping[str, Any]) -> str:
    """One line: ``<stage> failed: <cause>``."""
    return f"{record.get('stage', '?')} failed: {record.get('cause', '?')}"


def _is_access_error(exc: BaseException) -> bool:
    """True for errors that say nothing about the file's content (permissions, missing file)."""
    if isinstance(exc, PermissionError | FileNotFoundError | IsADirectoryError):
        return True
    text = str(exc)
    return "Permission denied" in text or "errno = 13" in text


def quarantine(
    path: str | Path, slide_id: str | None, problem: str, exc: BaseException
) -> SlideError:
    """Move the unreadable intermediate ``path`` aside to ``<path>.corrupt``; return the error.

    ``problem`` says what is wrong (``tiles file is not a readable HDF5 file``), ``exc`` is the
    read error. The returned :class:`SlideError` adds that the file was moved and that re-running
    the workflow regenerates it; the caller raises it. Access errors (permissions) leave the file
    where it is.
    """
    path = Path(path)
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _is_access_error(exc):
        return SlideError(slide_id, path, f"{problem}: {detail}")
    aside = path.with_name(path.name + CORRUPT_SUFFIX)
    try:
        os.replace(path, aside)
    except OSError as move_exc:
        log.warning("%s: could not move %s aside: %s", slide_id, path, move_exc)
        return SlideError(
            slide_id,
            path,
            f"{problem} ({detail}); delete it and re-run the workflow to regenerate it",
        )
    log.warning("%s: corrupt %s moved aside to %s", slide_id, path, aside)
    return SlideError(
        slide_id,
        path,
        f"{problem} ({detail}); moved aside to {aside.name}: re-run the workflow to regenerate it",
    )


# -- HDF5 outputs ----------------------------------------------------------------------------------
class OutputWriteError(OSError):
    """Writing an output failed (disk full, file too large, I/O error); nothing was written."""


class _GuardedFile:
    """A raw file for h5py's file-object driver that never lets a write error reach HDF5.

    The first failed write (disk full, file too large, I/O error) is kept in ``error``; it and
    every later write are then discarded as if done, and reads return zeros, so HDF5 stays
    consistent and can close the file. (HDF5 2.0 with h5py 3.16 crashes the interpreter later
    when a write error reaches it, through either driver.) The writer calls :meth:`check` to
    stop early; :func:`atomic_h5` raises the error at the end in any case.
    """

    def __init__(self, raw) -> None:
        self._raw = raw
        self.error: OSError | None = None

    def check(self) -> None:
        """Raise the first write error (as :class:`OutputWriteError`), if there was one."""
        if self.error is not None:
            raise _write_error(self.error)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    n = self._raw.write(view[done:])
                    if not n:
                        raise OSError(errno.EIO, "short write")
                    done += n
            except OSError as exc:
                self.error = exc
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._raw.tell() if size is None else size
        if self.error is None:
            try:
                self._raw.truncate(size)
            except OSError as exc:
                self.error = exc
        return size

    def flush(self) -> None:
        return None  # unbuffered

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self.error is not None:
            view[:] = bytes(len(view))
            return len(view)
        return self._raw.readinto(view)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self._raw.read()
        out = bytearray(size)
        return bytes(out[: self.readinto(out)])

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def _write_error(exc: OSError, path: str | Path | None = None) -> OutputWriteError:
    """``exc`` as an :class:`OutputWriteError` (naming ``path`` when given)."""
    if isinstance(exc, OutputWriteError):
        return exc
    if exc.errno is None:
        return OutputWriteError(f"{exc}: {path}" if path is not None else str(exc))
    if path is None:
        return OutputWriteError(exc.errno, exc.strerror or str(exc))
    return OutputWriteError(exc.errno, exc.strerror or str(exc), str(path))


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield ``<path>.tmp`` to write to; on success rename it onto ``path``, else delete it.

    An ``OSError`` while writing (disk full, file too large) is raised as
    :class:`OutputWriteError` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(exc, path) from exc
    finally:
        tmp.unlink(missing_ok=True)


def h5_attrs(obj: Any) -> dict[str, Any]:
    """Attributes of an h5py file, group or dataset as plain Python values: bytes decoded, numpy
    scalars unwrapped, arrays as tuples."""
    import numpy as np

    def plain(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, np.ndarray):
            return tuple(v.item() for v in value)
        if isinstance(value, np.generic):
            return value.item()
        return value

    return {k: plain(v) for k, v in obj.attrs.items()}


@contextmanager
def atomic_h5(path: str | Path) -> Iterator[tuple[Any, Callable[[], None]]]:
    """Write an HDF5 file atomically: yields ``(h5py.File on <path>.tmp, check)``.

    On success the ``.tmp`` is renamed onto ``path``. Writes go through :class:`_GuardedFile`:
    a failed write (disk full, file too large, I/O error) is raised as
    :class:`OutputWriteError` by ``check()`` (call it after writing a batch, to stop early) and,
    at the latest, after HDF5 has closed the file. On any error the ``.tmp`` is removed and ``path`` is left as it was.
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w+b", buffering=0) as raw:
            guard = _GuardedFile(raw)
            try:
                with h5py.File(guard, "w") as f:
                    yield f, guard.check
            except BaseException:
                if guard.error is not None:
                    raise _write_error(guard.error) from None
                raise
            if guard.error is not None:
                raise _write_error(guard.error)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
