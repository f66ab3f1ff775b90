"""Fault handling shared by the stages: failure records of per-slide jobs, corrupt intermediates.

Failure record (``results/{slide}/FAILED.json``): when a per-slide stage run with
``wsiscan --failure-record PATH <stage> ...`` fails, it writes ``{"slide_id", "stage", "error",
"cause", "time", "wsiscan_version"}`` to ``PATH`` atomically; when a stage run with the same
``PATH`` succeeds, it removes the record. The record lies outside Snakemake's outputs, so it
survives the failed job. The workflow's default target then asks for the output of the stage
that failed (so the stage is retried even where older files of the slide still exist), and with
``evaluate.allow_missing`` the evaluation leaves out the slides that have one
(:func:`failed_slides`) and lists them in ``metrics.json``.

DataLoader workers (:func:`worker_batches`): an error inside a worker process reaches the main
process as torch's multi-line text; it is turned into one line naming the slide and the cause (the
worker's own message for wsiscan errors), and a worker that ran out of shared memory
(``/dev/shm``, often 64 MB in containers) gets the remedy.

Corrupt intermediates (:func:`unreadable`): a stage that finds one of the workflow's own HDF5
intermediates (``rois.h5``, ``tiles.h5``, ``probmap.h5``) unreadable moves it aside to
``<name>.corrupt`` and fails with a message saying so; the next run regenerates it with the stage
that produced it (the file is missing and the failed stage's output is a target). Only files the
workflow wrote are moved: inside a ``results`` folder, an HDF5 file carrying the format's own
``format`` attribute, or, when HDF5 cannot open it at all, an HDF5 file (by its signature) with
the intermediate's name. Anything else (a slide given where a tiles file belongs, a copy of a
tiles file elsewhere) gets the error and stays where it is.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from . import __version__
from .errors import SlideError, WsiscanError
from .fileio import write_json

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
    write_json(path, record)


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


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: The file name of each HDF5 intermediate, by its ``format`` attribute.
INTERMEDIATE_NAMES = {
    "wsiscan-rois/1": "rois.h5",
    "wsiscan-tiles/1": "tiles.h5",
    "wsiscan-probmap/1": "probmap.h5",
}


def is_own_intermediate(path: str | Path, format_tag: str) -> bool:
    """Whether ``path`` is an intermediate the workflow wrote (see the module docstring): inside
    a ``results`` folder, and an HDF5 file with the format's own ``format`` attribute (or, when
    HDF5 cannot open it, the HDF5 signature and the intermediate's name)."""
    import h5py

    path = Path(path)
    if "results" not in path.resolve().parent.parts:
        return False
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") in (format_tag, format_tag.encode())
    except Exception:  # noqa: S110 (not readable as HDF5: judged by signature, name, folder)
        pass
    try:
        with open(path, "rb") as fh:
            signature = fh.read(len(HDF5_SIGNATURE))
    except OSError:
        return False
    return signature == HDF5_SIGNATURE and path.name == INTERMEDIATE_NAMES.get(format_tag)


def unreadable(
    path: str | Path, slide_id: str | None, problem: str, exc: BaseException, format_tag: str
) -> SlideError:
    """The error for an HDF5 intermediate that cannot be read; the file is moved aside to
    ``<path>.corrupt`` when the workflow wrote it (:func:`is_own_intermediate`).

    ``problem`` says what is wrong (``tiles file is not a readable HDF5 file``), ``exc`` is the
    read error. The caller raises the returned :class:`SlideError`. Access errors (permissions)
    and files the workflow did not write stay where they are.
    """
    path = Path(path)
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _is_access_error(exc):
        return SlideError(slide_id, path, f"{problem}: {detail}")
    if not is_own_intermediate(path, format_tag):
        return SlideError(
            slide_id,
            path,
            f"{problem} ({detail}); not a file the workflow wrote: left as it is",
        )
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


# -- DataLoader workers ----------------------------------------------------------------------------
T = TypeVar("T")
_CAUGHT = re.compile(r"^Caught (?P<type>\w+) in DataLoader worker process \d+\.")
_LAST = re.compile(r"^(?:[\w.]+\.)?(?P<type>\w+): (?P<message>.*)$")
SHARED_MEMORY = Path("/dev/shm")  # noqa: S108 (where torch puts shared tensors)


class WorkerError(WsiscanError):
    """A DataLoader worker process failed; the message names the slide (or the stage's input)
    and the cause, in one line."""


def _wsiscan_error_names() -> set[str]:
    names, todo = set(), [WsiscanError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def _shm_size() -> str:
    try:
        usage = shutil.disk_usage(SHARED_MEMORY)
    except OSError:
        return f"no {SHARED_MEMORY}"
    return f"{SHARED_MEMORY} holds {usage.total / 2**20:.0f} MB"


def worker_error(
    exc: BaseException, *, where: str, batch_bytes: int, batch_key: str, workers_key: str
) -> WsiscanError | None:
    """The one-line error for an exception a DataLoader raised from (or about) a worker process,
    or None when ``exc`` is not one (the caller re-raises it as it is).

    ``where`` names what is read (``slide 'x' (path)``); ``batch_bytes`` is the size of one
    batch and ``batch_key`` / ``workers_key`` the config keys of its batch size and workers,
    for the remedy when shared memory ran out.
    """
    text = str(exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    if "shared memory" in text.lower():
        return WorkerError(
            f"{where}: the DataLoader workers ran out of shared memory ({_shm_size()}; one "
            f"batch is {batch_bytes / 2**20:.1f} MB and each reading process keeps several): "
            f"give the job a larger {SHARED_MEMORY} (containers: docker run --shm-size=1g, or "
            f"the runtime's equivalent), or lower {batch_key}, or set {workers_key}: 0 (reads in "
            "the main process)"
        )
    caught = _CAUGHT.match(lines[0])
    if caught is None:
        if lines[0].startswith("DataLoader worker (pid"):  # killed by a signal, or vanished
            return WorkerError(
                f"{where}: a DataLoader worker process died ({lines[0]}): out of memory? "
                f"lower {batch_key} or {workers_key}"
            )
        return None
    last = _LAST.match(lines[-1])
    message = last.group("message") if last else lines[-1]
    kind = caught.group("type")
    if kind in _wsiscan_error_names():
        return WorkerError(message)  # names the slide, the file and the cause already
    if kind in ("OSError", "IOError", "FileNotFoundError", "PermissionError", "MemoryError"):
        return WorkerError(f"{where}: a DataLoader worker failed: {kind}: {message}")
    return None


def worker_batches(
    loader: Iterable[T], *, where: str, batch_bytes: int, batch_key: str, workers_key: str
) -> Iterator[T]:
    """The batches of ``loader``; an error from a worker process is raised as the one-line
    :class:`WorkerError` of :func:`worker_error` (torch's text, with the worker's traceback, is
    logged at debug level)."""
    keys = {"where": where, "batch_bytes": batch_bytes, "batch_key": batch_key}
    batches = None
    while True:
        try:
            if batches is None:
                batches = iter(loader)
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:
            error = worker_error(exc, workers_key=workers_key, **keys)
            if error is None:
                raise
            log.debug("DataLoader error: %s", exc)
            raise error from None
        yield batch
