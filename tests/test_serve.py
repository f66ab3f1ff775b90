"""Several slides of one SLURM job in one inference process (``infer.share_process``,
:mod:`wsiscan.serve`): the same tiles as one process per slide, the model loaded once, and a
failing slide that fails only its own command, with its failure record."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.test_infer_stitch import all_blocks, model_file, slide, write_rois  # noqa: F401
from wsiscan.serve import ServerError, server_dir

pytestmark = pytest.mark.skipif(not hasattr(os, "getuid"), reason="Unix sockets and uids")


@pytest.fixture
def inputs(request) -> tuple[Path, Path]:
    """test_infer_stitch's synthetic slide and slim model: (slide path, model.pt)."""
    return request.getfixturevalue("slide")[0], request.getfixturevalue("model_file")


@pytest.fixture
def job_env():
    """The environment of a fake SLURM job: its ID, its task (a process) and a short TMPDIR (Unix
    socket paths are short); the job's server is stopped afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="wsi-"))
    task = subprocess.Popen(["sleep", "600"])  # the job's task (in SLURM: the group's Snakemake)
    env = dict(os.environ, SLURM_JOB_ID=f"t{uuid.uuid4().hex[:8]}", TMPDIR=str(tmp))
    env["SLURM_TASK_PID"] = str(task.pid)
    yield env
    task.kill()
    with contextlib.suppress(ChildProcessError):
        task.wait()
    log = tmp / f"wsiscan-infer-{os.getuid()}-{env['SLURM_JOB_ID']}" / "server.log"
    if log.exists():
        for pid in re.findall(r"inference server pid (\d+)", log.read_text()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
    shutil.rmtree(tmp, ignore_errors=True)


def infer_cmd(slide_path: Path, rois: Path, model: Path, out: Path, slide_id: str) -> list[str]:
    return [
        *(sys.executable, "-m", "wsiscan", "--failure-record", str(out.parent / "FAILED.json")),
        *("infer", "--slide-id", slide_id, "--slide", str(slide_path), "--rois", str(rois)),
        *("--model", str(model), "--out-tiles", str(out), "--device", "cpu", "--workers", "1"),
    ]


def run(cmd: list[str], env: dict[str, str], share: bool) -> subprocess.CompletedProcess:
    flag = "--share-process" if share else "--no-share-process"
    return subprocess.run([*cmd, flag], env=env, capture_output=True, text=True, timeout=600)


def server_log(env: dict[str, str]) -> str:
    folder = Path(env["TMPDIR"]) / f"wsiscan-infer-{os.getuid()}-{env['SLURM_JOB_ID']}"
    return (folder / "server.log").read_text()


def prepare(tmp_path: Path, name: str, wh=None) -> tuple[Path, Path]:
    folder = tmp_path / name
    folder.mkdir()
    kwargs = {"wh": wh} if wh else {}
    rois = write_rois(folder / "rois.h5", all_blocks(), slide_id=name, **kwargs)
    return rois, folder / "tiles.h5"


def tiles_of(path: Path) -> tuple[np.ndarray, dict]:
    with h5py.File(path) as f:
        attrs = {k: f.attrs[k] for k in ("model_checksum", "slide_id", "device")}
        return f["tiles"][:], attrs


def test_slides_of_a_job_share_one_process_and_get_the_same_tiles(inputs, tmp_path, job_env):
    slide_path, model = inputs
    alone_rois, alone_out = prepare(tmp_path, "s_alone")
    proc = run(infer_cmd(slide_path, alone_rois, model, alone_out, "s_alone"), job_env, False)
    assert proc.returncode == 0, proc.stderr
    assert not list(Path(job_env["TMPDIR"]).iterdir())  # --no-share-process: no server

    logs = []
    for name in ("s1", "s2", "s3"):
        rois, out = prepare(tmp_path, name)
        proc = run(infer_cmd(slide_path, rois, model, out, name), job_env, True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.rstrip().endswith("wsiscan infer: done"), proc.stderr
        logs.append(proc.stderr)
        tiles, attrs = tiles_of(out)
        ref, ref_attrs = tiles_of(alone_out)
        assert np.array_equal(tiles, ref)  # bit-identical to the slide's own process
        assert attrs["slide_id"] == name and attrs["model_checksum"] == ref_attrs["model_checksum"]
    # outside a SLURM job the option changes nothing: the command runs alone
    outside = {k: v for k, v in job_env.items() if k != "SLURM_JOB_ID"}
    rois, out = prepare(tmp_path, "s_outside")
    proc = run(infer_cmd(slide_path, rois, model, out, "s_outside"), outside, True)
    assert proc.returncode == 0 and np.array_equal(tiles_of(out)[0], tiles_of(alone_out)[0])
    assert "already loaded" not in proc.stderr
    # one server for the job; the model loaded by the first slide only
    assert len(re.findall(r"inference server pid \d+", server_log(job_env))) == 1
    assert "already loaded in this process" not in logs[0]
    assert all("already loaded in this process" in text for text in logs[1:])


def test_a_failing_slide_fails_alone_with_its_record(inputs, tmp_path, job_env):
    slide_path, model = inputs
    good_rois, good_out = prepare(tmp_path, "good")
    assert run(infer_cmd(slide_path, good_rois, model, good_out, "good"), job_env, True).returncode == 0  # fmt: skip
    # a grid made for a slide of another size: a SlideError in the server
    bad_rois, bad_out = prepare(tmp_path, "bad", wh=(400, 300))
    proc = run(infer_cmd(slide_path, bad_rois, model, bad_out, "bad"), job_env, True)
    assert proc.returncode == 1
    assert "wsiscan infer: error:" in proc.stderr and "400x300" in proc.stderr
    assert "Traceback" not in proc.stderr
    record = json.loads((bad_out.parent / "FAILED.json").read_text())
    assert record["stage"] == "infer" and record["slide_id"] == "bad"
    assert not bad_out.exists()
    assert good_out.exists() and not (good_out.parent / "FAILED.json").exists()
    # the next slide of the job is served by the same process
    next_rois, next_out = prepare(tmp_path, "next")
    proc = run(infer_cmd(slide_path, next_rois, model, next_out, "next"), job_env, True)
    assert proc.returncode == 0, proc.stderr
    assert "already loaded in this process" in proc.stderr
    assert len(re.findall(r"inference server pid \d+", server_log(job_env))) == 1


def test_server_folder_is_private_and_never_a_link(tmp_path):
    env = {"TMPDIR": str(tmp_path)}
    folder = server_dir("j1", env)
    assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700
    assert server_dir("j1", env) == folder  # the job's next command finds it
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / f"wsiscan-infer-{os.getuid()}-j2").symlink_to(target)
    with pytest.raises(ServerError, match="not a folder"):
        server_dir("j2", env)
    (tmp_path / f"wsiscan-infer-{os.getuid()}-j3").mkdir(mode=0o755)
    os.chmod(tmp_path / f"wsiscan-infer-{os.getuid()}-j3", 0o755)  # noqa: S103 (the case tested)
    with pytest.raises(ServerError, match="open to others"):
        server_dir("j3", env)


def test_server_ends_with_its_slurm_task(inputs, tmp_path, job_env):
    slide_path, model = inputs
    rois, out = prepare(tmp_path, "s1")
    assert run(infer_cmd(slide_path, rois, model, out, "s1"), job_env, True).returncode == 0
    (pid,) = map(int, re.findall(r"inference server pid (\d+)", server_log(job_env)))
    task = int(job_env["SLURM_TASK_PID"])
    os.kill(task, signal.SIGKILL)  # the job ends
    os.waitpid(task, 0)  # reaped (slurmstepd reaps a real task)
    for _ in range(120):  # a condition awaited, not a duration measured
        if not Path(f"/proc/{pid}").exists() or "exiting" in server_log(job_env):
            break
        time.sleep(0.5)
    assert "the SLURM task that started it has ended: exiting" in server_log(job_env)
