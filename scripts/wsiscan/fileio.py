"""Writing outputs safely: atomic files, HDF5 and JSON outputs, attributes and checksums.

Every file a stage writes goes through :func:`atomic_write` (or :func:`atomic_h5` for HDF5):

* the bytes go to a temporary file in the output's own folder, named
  ``.<name>.<host>.<pid>.<random>.tmp`` and created exclusively (``O_CREAT | O_EXCL |
  O_NOFOLLOW``): no symbolic link planted there is ever followed and no other writer's file is
  ever opened;
* the writer gets the open file object (the temporary file is never re-opened by name);
* when the block ends without an error the data are flushed to disk (``fsync``) and the file is
  renamed onto the output (``os.replace``, atomic on POSIX; a symbolic link at the output's name is
  replaced, not followed). On an error the temporary file is removed and the output is untouched.

So a file under its final name is always complete and written by one writer: two writers of the
same output (an orphaned job still running next to its re-run) each finish their own file, and the
last rename wins. Temporary files of writers that were killed (``kill -9``, out of memory) stay
behind; the next writer of the same output on the same host removes those whose process is gone.

Write errors (disk full, file too large, I/O error) are raised as :class:`OutputWriteError`, an
``OSError`` naming the output.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
_OPEN_FLAGS |= getattr(os, "O_CLOEXEC", 0)


class OutputWriteError(OSError):
    """Writing an output failed (disk full, file too large, I/O error); nothing was written."""


def _write_error(exc: OSError, path: str | Path | None = None) -> OutputWriteError:
    """``exc`` as an :class:`OutputWriteError` (naming ``path`` when given)."""
    if isinstance(exc, OutputWriteError):
        return exc
    if exc.errno is None:
        return OutputWriteError(f"{exc}: {path}" if path is not None else str(exc))
    if path is None:
        return OutputWriteError(exc.errno, exc.strerror or str(exc))
    return OutputWriteError(exc.errno, exc.strerror or str(exc), str(path))


def _temp_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(path.name)}\.{re.escape(_HOST)}\.(\d+)\.[0-9a-f]+\.tmp$")


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files of ``path`` left by writers on this host whose process is gone."""
    pattern = _temp_pattern(path)
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(entry.path)
                log.info("removed %s, left by a writer that was killed", entry.path)
            except OSError:
                pass
        except OSError:  # alive, or not ours to signal
            continue


def create_temp_file(path: str | Path) -> tuple[Path, int]:
    """Create the temporary file of output ``path`` exclusively; returns ``(its path, fd)``.

    The folder of ``path`` is created when missing. See the module docstring for the name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, _OPEN_FLAGS, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "cannot create a unique temporary file", str(path))


@contextmanager
def atomic_write(path: str | Path) -> Iterator[IO[bytes]]:
    """Yield a binary file object; on success its bytes replace ``path`` atomically.

    ``path`` is written only when the block ends without an error; otherwise the temporary file
    is removed and ``path`` is left as it was. Write errors are raised as
    :class:`OutputWriteError` naming ``path``.
    """
    path = Path(path)
    try:
        tmp, fd = create_temp_file(path)
    except OSError as exc:
        raise _write_error(exc, path) from exc
    try:
        raw = io.FileIO(fd, "r+")
        raw.name = str(tmp)  # the path (not the fd) for writers that ask for the file's name
        with io.BufferedRandom(raw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(exc, path) from exc
    finally:
        _unlink_quietly(tmp)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path) as fh:
        fh.write(data)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented JSON (no NaN or infinity) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new empty folder beside ``path``; on success it replaces the folder ``path``.

    Used for folder outputs the workflow declares (``results/cohort/submission``): the old folder
    is renamed aside first and removed after the new one is in place.
    """
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.is_dir() and not path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        elif path.exists() or path.is_symlink():
            raise OutputWriteError(errno.EEXIST, "not a folder, left alone", str(path))
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise _write_error(exc, path) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- HDF5 ------------------------------------------------------------------------------------------
class _GuardedFile:
    """A raw file for h5py's file-object driver that never lets a write error reach HDF5.

    The first failed write (disk full, file too large, I/O error) is kept in ``error``; it and
    every later write are then discarded as if done, and reads return zeros, so HDF5 stays
    consistent and can close the file. (HDF5 2.0 with h5py 3.16 crashes the interpreter later
    when a write error reaches it, through either driver.) The writer calls ``check()`` to stop
    early; :func:`atomic_h5` raises the error at the end in any case.
    """

    def __init__(self, raw: IO[bytes]) -> None:
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
        return None  # writes go straight to the file

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


@contextmanager
def atomic_h5(path: str | Path) -> Iterator[tuple[Any, Callable[[], None]]]:
    """Write an HDF5 file atomically: yields ``(h5py.File, check)``.

    The file object behind the HDF5 file is that of :func:`atomic_write`, wrapped so that write
    errors never reach HDF5; ``check()`` raises the first one as :class:`OutputWriteError` (call
    it after writing a batch, to stop early), and it is raised at the latest once HDF5 has closed
    the file. h5py records no object times (its default), so equal data give equal bytes.
    """
    import h5py

    with atomic_write(path) as fh:
        # the unbuffered file under atomic_write's buffered one: a write error must show in
        # write(), where the guard keeps it, not in a later seek() or read() that flushes a
        # buffer (it would reach HDF5 and crash the interpreter at exit)
        guard = _GuardedFile(fh.raw)
        try:
            with h5py.File(guard, "w") as f:
                yield f, guard.check
        except BaseException:
            if guard.error is not None:
                raise _write_error(guard.error, path) from None
            raise
        if guard.error is not None:
            raise _write_error(guard.error, path)


def h5_attrs(obj: Any) -> dict[str, Any]:
    """Attributes of an h5py file, group or dataset as plain Python values: bytes decoded, numpy
    scalars unwrapped, arrays as tuples."""
    import numpy as np

    def plain(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, np.ndarray):  # numbers, or strings (a tuple of str setting)
            return tuple(plain(v) for v in value)
        if isinstance(value, np.generic):
            return value.item()
        return value

    return {k: plain(v) for k, v in obj.attrs.items()}


# -- checksums -------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_json(obj: object, length: int | None = None) -> str:
    """SHA-256 hex digest of ``obj`` as sorted JSON (``length`` leading hex digits when given)."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:length] if length else digest
