"""One inference process for every slide of a SLURM job (``infer.share_process``).

With the SLURM profile's ``infer`` group, one GPU job runs the ``infer`` jobs of several slides
one after another; each job still starts ``wsiscan infer``, which would import torch, initialise
CUDA and load the model again. With ``infer.share_process`` the command becomes a client: the
first slide of the job starts an *inference server* (``wsiscan infer-server``, the same package,
the torch stages' allocator settings), every slide's command hands its arguments to it over a Unix
socket and prints what the server logs for it into the job's own log. The server runs the
``infer`` stage in its own process, slide after slide, with the model loaded once per checkpoint
(:func:`wsiscan.infer.load_scan_model` keeps it, keyed by the file's SHA-256) and the device
initialised once. Outputs, logs, failure records and exit codes are those of the plain command:
a slide that fails fails its own Snakemake job only, and the server goes on with the next.

The server is bound to the SLURM job (``SLURM_JOB_ID``; without one, the command runs in its own
process as usual): its socket lives in a folder only the user can open
(``$TMPDIR/wsiscan-infer-<uid>-<job id>``, mode 0700, never through a symbolic link), and it ends
as soon as the job's task that started it (``SLURM_TASK_PID``: the group job's Snakemake) has
ended, whether or not SLURM's process tracking ends it, or after :data:`IDLE_S` seconds without a
slide. Only ``infer`` requests are served.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

#: seconds the server waits for the next slide before it exits
IDLE_S = 120.0
#: seconds between the server's checks that its SLURM task (``SLURM_TASK_PID``) still runs
POLL_S = 1.0
#: seconds a client waits for a server it started to listen (imports torch, initialises nothing)
START_TIMEOUT_S = 300.0
#: the server's last line for a request: this marker, then the stage's exit code
RC_MARKER = "\x1ewsiscan-infer-server-rc="
_JOB_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_SOCKET_PATH = 100  # sockaddr_un holds 108 bytes


class ServerError(RuntimeError):
    """The server folder cannot be used, or the server stopped during a request."""


def job_key(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The SLURM job a server belongs to (``SLURM_JOB_ID``), or None outside a SLURM job."""
    job = environ.get("SLURM_JOB_ID", "")
    return job if _JOB_ID.fullmatch(job) else None


def server_dir(job: str, environ: dict[str, str] | os._Environ = os.environ) -> Path:
    """The job's server folder, created with mode 0700 if missing; :class:`ServerError` unless it
    is a real folder (not a link) of this user that nobody else can open."""
    root = Path(environ.get("TMPDIR") or tempfile.gettempdir())
    path = root / f"wsiscan-infer-{os.getuid()}-{job}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ServerError(f"{path} is not a folder (a link or a file): not used")
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ServerError(f"{path} belongs to another user or is open to others: not used")
    if len(str(path / "sock")) > _MAX_SOCKET_PATH:
        raise ServerError(f"{path}: too long for a Unix socket (set TMPDIR to a shorter folder)")
    return path


# -- client ----------------------------------------------------------------------------------------
def _connect(sock_path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(sock_path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    return conn


def _start_server(folder: Path) -> socket.socket:
    """Start the job's server (one at a time: a lock file in ``folder``) and connect to it."""
    import fcntl

    lock_fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        conn = _connect(folder / "sock")  # another slide's command may have started it meanwhile
        if conn is not None:
            return conn
        (folder / "sock").unlink(missing_ok=True)  # a server that ended left its socket
        log_fd = os.open(folder / "server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)  # fmt: skip
        try:
            proc = subprocess.Popen(  # noqa: S603 (an argument list, no shell)
                [sys.executable, "-m", "wsiscan", "infer-server", "--dir", str(folder)],
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
            )
        finally:
            os.close(log_fd)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            conn = _connect(folder / "sock")
            if conn is not None:
                return conn
            if proc.poll() is not None:
                raise ServerError(f"the inference server exited ({proc.returncode}): see "
                                  f"{folder / 'server.log'}")  # fmt: skip
            time.sleep(0.1)
        proc.kill()
        raise ServerError(f"the inference server did not start in {START_TIMEOUT_S:.0f} s")
    finally:
        os.close(lock_fd)


def run_client(argv: list[str], job: str) -> int:
    """Have the server of SLURM job ``job`` run ``wsiscan <argv>`` (an ``infer`` command); its
    log goes to this process's stderr. Returns the stage's exit code."""
    folder = server_dir(job)
    conn = _connect(folder / "sock") or _start_server(folder)
    with conn, conn.makefile("rw", encoding="utf-8", newline="\n") as stream:
        stream.write(json.dumps({"argv": argv, "cwd": os.getcwd()}) + "\n")
        stream.flush()
        for line in stream:
            if line.startswith(RC_MARKER):
                return int(line[len(RC_MARKER) :])
            sys.stderr.write(line)
            sys.stderr.flush()
    raise ServerError(f"the inference server stopped during the request: see "
                      f"{folder / 'server.log'}")  # fmt: skip


# -- server ----------------------------------------------------------------------------------------
class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is now (the request's connection)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _serve_one(stream: TextIO, dispatch: Any, parser: argparse.ArgumentParser) -> None:
    request = json.loads(stream.readline() or "{}")
    argv = [str(a) for a in request.get("argv", [])]
    with contextlib.redirect_stderr(stream):
        try:
            os.chdir(request.get("cwd") or ".")  # the slide's command's own folder
            args = parser.parse_args(argv)
            if args.stage != "infer":
                raise ServerError(f"the inference server runs infer only, not {args.stage!r}")
            args.share_process = False
            rc = dispatch(args)
        except SystemExit as exc:  # argparse's errors
            rc = exc.code if isinstance(exc.code, int) else 2
        except Exception:  # a bug in the stage: its traceback in the slide's log, then next
            traceback.print_exc()
            rc = 1
        stream.write(f"{RC_MARKER}{rc}\n")
        stream.flush()


def _start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None if it is not running."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def task_watch(environ: dict[str, str] | os._Environ = os.environ) -> Any:
    """A function that tells whether the SLURM task of ``SLURM_TASK_PID`` still runs (the same
    process: its start time is compared); always True without one."""
    try:
        pid = int(environ.get("SLURM_TASK_PID", ""))
    except ValueError:
        return lambda: True
    started = _start_ticks(pid)
    return lambda: started is not None and _start_ticks(pid) == started


def serve(folder: Path, dispatch: Any, parser: argparse.ArgumentParser) -> int:
    """Serve ``infer`` requests on ``folder/sock`` one at a time until :data:`IDLE_S` seconds
    pass without one. ``dispatch(args) -> exit code`` runs a parsed command."""
    from . import infer

    infer.KEEP_MODELS = True
    logging.getLogger().handlers[:] = []
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=_CurrentStderr(),
        force=True,
    )
    sock_path = folder / "sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))  # fails if the path exists: never through a link
    listener.listen(16)
    listener.settimeout(POLL_S)
    task_runs = task_watch()
    print(f"inference server pid {os.getpid()} on {sock_path}", file=sys.__stderr__, flush=True)
    served, idle_since, why = 0, time.monotonic(), ""
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if not task_runs():
                    why = "the SLURM task that started it has ended"
                    break
                if time.monotonic() - idle_since > IDLE_S:
                    why = f"idle {IDLE_S:.0f} s"
                    break
                continue
            conn.settimeout(None)
            with conn, conn.makefile("rw", encoding="utf-8", newline="\n") as stream:
                try:
                    _serve_one(stream, dispatch, parser)
                except (BrokenPipeError, ConnectionResetError, json.JSONDecodeError) as exc:
                    print(f"request dropped: {exc!r}", file=sys.__stderr__, flush=True)
            served += 1
            idle_since = time.monotonic()
    finally:
        listener.close()
        sock_path.unlink(missing_ok=True)
    print(f"served {served} slides; {why}: exiting", file=sys.__stderr__, flush=True)
    return 0
