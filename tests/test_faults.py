"""Faults (issue 9): failure records, corrupt intermediates, write errors, a killed infer job, and
one broken slide in a cohort run under --keep-going (with and without evaluate.allow_missing).

Unit- and stage-level tests run in the quick suite; the two Snakemake runs are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from wsiscan.cli import main
from wsiscan.faults import (
    HDF5_SIGNATURE,
    clear_failure_record,
    failed_slides,
    read_failure_record,
    unreadable,
    write_failure_record,
)
from wsiscan.formats.tiles import FORMAT as TILES_FORMAT

from .conftest import BIN, REPO, run_snakemake, snakemake_env
from .test_bad_input import (
    HEADER,
    STAGES,
    Result,
    assert_one_line_error,
    damage_tile,
    he_image,
    run_cli,
    stage_args,
    temp_files,
    write_tiff,
)


# -- failure records -------------------------------------------------------------------------------
def test_failure_record_roundtrip(tmp_path):
    path = tmp_path / "results" / "s1" / "FAILED.json"
    write_failure_record(path, stage="infer", slide_id="s1", cause="boom", error="SlideError")
    rec = read_failure_record(path)
    assert rec["stage"] == "infer" and rec["cause"] == "boom" and rec["slide_id"] == "s1"
    assert rec["wsiscan_version"] and rec["time"]
    assert not temp_files(path.parent)
    assert clear_failure_record(path) and not path.exists()
    assert not clear_failure_record(path)
    assert read_failure_record(path) is None


def test_failed_slides_ignores_records_older_than_the_slide(tmp_path):
    slides = {sid: tmp_path / f"{sid}.tif" for sid in ("a", "b", "c")}
    for p in slides.values():
        p.write_bytes(b"x")
    for sid in ("a", "b"):
        write_failure_record(
            tmp_path / "results" / sid / "FAILED.json",
            stage="tissue_mask",
            slide_id=sid,
            cause="bad",
            error="SlideError",
        )
    past = time.time() - 100
    for p in slides.values():
        os.utime(p, (past, past))
    for sid in ("a", "b"):
        os.utime(tmp_path / "results" / sid / "FAILED.json", (past + 10, past + 10))
    os.utime(slides["b"], (past + 20, past + 20))  # b's file was replaced after it failed
    found = failed_slides(tmp_path / "results", {sid: [p] for sid, p in slides.items()})
    assert list(found) == ["a"] and found["a"]["stage"] == "tissue_mask"


def test_cli_records_a_failure_and_clears_it_on_success(capsys, tmp_path):
    record = tmp_path / "results" / "s1" / "FAILED.json"
    slide = tmp_path / "s1.tif"
    r = Result(tmp_path, slide, "s1")
    argv = ["--failure-record", record, *stage_args(r, "tissue_mask", Path("unused"))]
    rc, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, "tissue_mask", "file not found")
    rec = json.loads(record.read_text())
    assert rec["stage"] == "tissue_mask" and rec["error"] == "SlideError"
    assert "s1.tif" in rec["cause"] and "file not found" in rec["cause"]
    write_tiff(slide, he_image(512, 640))
    rc, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert not record.exists() and r.mask.is_file()


def test_quarantine_leaves_unreadable_files_it_may_not_judge(tmp_path):
    # a damaged tiles.h5 the workflow wrote: HDF5 signature, its name, in a results folder
    data = HDF5_SIGNATURE + b"data"
    path = tmp_path / "results" / "s1" / "tiles.h5"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    problem = "tiles file is unreadable"
    denied = PermissionError(13, "Permission denied")
    err = unreadable(path, "s1", problem, denied, TILES_FORMAT)
    assert path.exists() and "Permission denied" in err.cause and "moved" not in err.cause
    err = unreadable(path, "s1", problem, OSError("bad signature"), TILES_FORMAT)
    assert not path.exists() and (path.parent / "tiles.h5.corrupt").read_bytes() == data
    assert "moved aside to tiles.h5.corrupt" in err.cause and "re-run" in err.cause
    # files the workflow did not write stay: no HDF5 signature, or outside a results folder
    for other, content in ((path, b"data"), (tmp_path / "tiles.h5", data)):
        other.write_bytes(content)
        err = unreadable(other, "s1", problem, OSError("bad signature"), TILES_FORMAT)
        assert other.read_bytes() == content and "moved" not in err.cause
        assert "not a file the workflow wrote: left as it is" in err.cause
    assert (path.parent / "tiles.h5.corrupt").read_bytes() == data
    assert not (tmp_path / "tiles.h5.corrupt").exists()


# -- corrupt intermediates -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_pt(tmp_path_factory) -> Path:
    from wsiscan.model import init_model
    from wsiscan.params import InitModelParams

    path = tmp_path_factory.mktemp("model") / "init.pt"
    init_model(path, InitModelParams(width=0.125, seed=0))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model_pt) -> Result:
    """A 1024x768 px slide through every per-slide stage; tests work on copies."""
    root = tmp_path_factory.mktemp("finished")
    r = Result(root, write_tiff(root / "s1.tif", he_image(768, 1024, seed=4)), "s1")
    for stage in STAGES:
        assert main([str(a) for a in stage_args(r, stage, model_pt)]) == 0, stage
    return r


@pytest.fixture
def copy(finished: Result, tmp_path: Path) -> Result:
    shutil.copytree(finished.root / "results", tmp_path / "results")
    return Result(tmp_path, finished.slide, finished.sid)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def spoil_chunk(path: Path, dataset: str, index: int = 0) -> None:
    """Overwrite the middle of one compressed chunk of ``dataset`` (its inflate then fails)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(index)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 4)
        fh.write(np.random.default_rng(0).bytes(max(8, info.size // 2)))


@pytest.mark.parametrize(
    ("stage", "name", "damage", "words"),
    [
        ("stitch", "tiles", "truncate", ["tiles file is not a readable HDF5 file"]),
        ("stitch", "tiles", "chunk", ["tiles file has unreadable data"]),
        ("infer", "rois", "garbage", ["ROI grid file is not a readable HDF5 file"]),
        ("detect", "probmap", "truncate", ["probability map is not a readable HDF5 file"]),
        ("detect", "probmap", "chunk", ["probability map has unreadable data"]),
    ],
)
def test_corrupt_intermediate_is_moved_aside(capsys, copy, model_pt, stage, name, damage, words):
    """The consumer names the file and the cause, moves the file to <name>.corrupt so that
    Snakemake regenerates it on the next run, and writes nothing itself."""
    target: Path = getattr(copy, name)
    if damage == "truncate":
        truncate(target)
    elif damage == "chunk":
        spoil_chunk(target, {"tiles": "tiles", "probmap": "prob"}[name])
    else:  # garbage after the HDF5 signature (a file that is HDF5 by its first bytes only)
        target.write_bytes(HDF5_SIGNATURE + np.random.default_rng(1).bytes(4096))
    outputs = {"infer": [copy.tiles], "stitch": [copy.probmap], "detect": [copy.lesions]}[stage]
    for out in outputs:
        out.unlink()
    rc, err = run_cli(capsys, *stage_args(copy, stage, model_pt))
    line = assert_one_line_error(rc, err, stage, "slide 's1'", target.name, *words)
    assert f"moved aside to {target.name}.corrupt" in line and "re-run" in line
    assert not target.exists() and Path(f"{target}.corrupt").is_file()
    for out in outputs:
        assert not out.exists() and not temp_files(out.parent)


def test_evaluate_allow_missing_lists_a_corrupt_map(capsys, copy, tmp_path):
    truncate(copy.probmap)
    sheet = tmp_path / "slides.tsv"
    sheet.write_text(HEADER + f"s1\t{copy.slide}\t\tnormal\ttest\n")
    argv = ["evaluate", "--sheet", sheet, "--results-dir", copy.root / "results", "--out-dir"]
    rc, err = run_cli(capsys, *argv, tmp_path / "c1", "--bootstrap", "0")
    assert_one_line_error(rc, err, "evaluate", "slide 's1'", "probmap.h5", "moved aside")
    truncate(Path(f"{copy.probmap}.corrupt"))  # the same damage, again in place
    os.replace(f"{copy.probmap}.corrupt", copy.probmap)
    rc, err = run_cli(capsys, *argv, tmp_path / "c2", "--bootstrap", "0", "--allow-missing")
    assert rc == 0, err
    metrics = json.loads((tmp_path / "c2" / "metrics.json").read_text())
    assert metrics["n_slides"] == 0 and metrics["missing"][0]["slide_id"] == "s1"
    assert "probmap.h5" in metrics["missing"][0]["cause"]


# -- provenance ------------------------------------------------------------------------------------
def test_every_output_records_version_and_model(capsys, finished, model_pt, tmp_path):
    from wsiscan import __version__
    from wsiscan.annotations import read_asap_xml
    from wsiscan.fileio import sha256_file

    sha = sha256_file(model_pt)
    with h5py.File(finished.rois) as f:
        assert f.attrs["wsiscan_version"] == __version__ and f.attrs["geometry_checksum"]
    for path in (finished.tiles, finished.probmap):
        with h5py.File(path) as f:
            assert f.attrs["model_checksum"] == sha and f.attrs["wsiscan_version"] == __version__
    score = json.loads(finished.score.read_text())
    assert score["model_checksum"] == sha and score["wsiscan_version"] == __version__
    meta = json.loads(finished.geojson.read_text())["wsiscan"]
    assert meta["model_checksum"] == sha and meta["slide_id"] == "s1" and "threshold" in meta
    xml = finished.xml.read_text()
    assert f"model_checksum={sha}" in xml and f"wsiscan_version={__version__}" in xml
    assert len(read_asap_xml(finished.xml)) == score["n_regions"]  # the comment is ignored

    sheet = tmp_path / "slides.tsv"
    sheet.write_text(HEADER + f"s1\t{finished.slide}\t\tnormal\ttest\n")
    argv = ["evaluate", "--sheet", sheet, "--results-dir", finished.root / "results", "--out-dir"]
    rc, err = run_cli(
        capsys, *argv, tmp_path / "c", "--bootstrap", "0", "--model", model_pt,
        "--config-checksum", "0123456789abcdef",
    )  # fmt: skip
    assert rc == 0, err
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["model"] == {"path": str(model_pt), "sha256": sha, "round": None}  # untrained
    assert metrics["model_checksums"] == [sha] and metrics["wsiscan_version"] == __version__
    assert metrics["config_checksum"] == "0123456789abcdef"


# -- write errors ----------------------------------------------------------------------------------
def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("stage", ["stitch", "infer"])
def test_file_too_large_fails_cleanly(copy, model_pt, stage):
    """RLIMIT_FSIZE makes every write past 1 KiB fail with EFBIG (a real write error; Python
    ignores SIGXFSZ): one line with the cause, and no output, not even a half-written
    temporary file."""
    out = {"stitch": copy.probmap, "infer": copy.tiles}[stage]
    out.unlink()
    argv = [str(a) for a in stage_args(copy, stage, model_pt)]
    proc = subprocess.run(
        [str(BIN / "wsiscan"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=snakemake_env(),
        preexec_fn=_limit_file_size(1024),
    )
    assert_one_line_error(
        proc.returncode, proc.stderr, stage, "slide 's1'", out.name, "nothing was written",
        "File too large",
    )  # fmt: skip
    assert not out.exists() and not temp_files(out.parent)


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 256 KiB tmpfs filled to the last byte (needs root and mount rights, else skipped)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        with open(mnt / "filler", "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize(
    ("stage", "names"),
    [
        ("stitch", r"probmap\.h5|heatmap\.png"),
        ("infer", r"tiles\.h5"),
        ("detect", r"lesions\.(csv|geojson|xml)|score\.json"),
    ],
)
def test_disk_full_fails_cleanly(capsys, copy, model_pt, full_disk, stage, names):
    """ENOSPC on a real (tmpfs) file system: one line naming the output and the cause, and
    nothing left in the full file system, not even a ``.tmp``."""
    argv = stage_args(copy, stage, model_pt)
    outs = ("--out-tiles", "--out-probmap", "--out-qc", "--out-lesions", "--out-score")
    for flag in (*outs, "--out-geojson", "--out-xml"):
        if flag in argv:
            k = argv.index(flag) + 1
            argv[k] = full_disk / Path(argv[k]).name
    rc, err = run_cli(capsys, *argv)
    line = assert_one_line_error(rc, err, stage, "slide 's1'", "No space left on device")
    assert re.search(names, line) and re.search("nothing was written|cannot write", line), line
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


# -- Snakemake runs --------------------------------------------------------------------------------
def write_config(root: Path, rows: list[str], **changes: dict) -> None:
    """A fast config in ``root/config``: the given sheet rows, n = 20, untrained model."""
    (root / "config").mkdir(exist_ok=True)
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["samples"] = "config/slides.tsv"
    cfg["demo"].update(width_px=1100, height_px=1100, mpp=1.0)  # >= 800 um a side (jitter)
    cfg["scan"]["n"] = 20
    cfg["train"]["rounds"] = 0
    cfg["infer"].update(workers=1, batch_size=4, device="cpu")
    cfg["evaluate"]["bootstrap"] = 20
    for section, values in changes.items():
        cfg[section].update(values)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (root / "config" / "slides.tsv").write_text(HEADER + "".join(r + "\n" for r in rows))


def set_config(root: Path, section: str, **values) -> None:
    path = root / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg[section].update(values)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def read_prob(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["prob"][()]


@pytest.mark.slow
def test_cohort_with_a_broken_slide(workdir):
    """Slide ``bad`` has a tile that cannot be decoded: its infer job fails, the other slides (a
    demo tumour slide and a blank one) finish under --keep-going. With evaluate.allow_missing the
    next run evaluates them and lists ``bad`` as missing; replacing its file brings it back. A
    corrupt tiles.h5 is moved aside by stitch and regenerated by the next run."""
    root = workdir
    (root / "slides").mkdir()
    write_tiff(root / "slides" / "blank.tif", he_image(1200, 1500, tissue=False))
    bad = write_tiff(root / "slides" / "bad.tif", he_image(1200, 1500, seed=5))
    damage_tile(bad, (2, 2))
    rows = [
        "t1\tdata/demo/t1.tif\tdata/demo/t1.xml\ttumor\ttest",
        "blank\tslides/blank.tif\t\tnormal\ttest",
        "bad\tslides/bad.tif\t\tnormal\ttest",
    ]
    write_config(root, rows)
    res = root / "results"

    # 1. keep-going: bad fails at infer, the others finish; no evaluation, a message
    proc = run_snakemake(root, "--cores", "2", "--keep-going", check=False)
    assert proc.returncode != 0
    for sid in ("t1", "blank"):
        assert (res / sid / "lesions.csv").is_file(), proc.stderr[-3000:]
        assert not (res / sid / "FAILED.json").exists()
    blank = json.loads((res / "blank" / "score.json").read_text())
    assert blank["score"] == 0.0 and blank["n_lesions"] == 0
    record = json.loads((res / "bad" / "FAILED.json").read_text())
    assert record["stage"] == "infer" and "level0_xy" in record["cause"]
    assert not (res / "bad" / "tiles.h5").exists()
    log = (res / "logs" / "infer" / "bad.log").read_text()
    assert re.search(r"infer: error: slide 'bad' \(slides/bad.tif\): block \d+: cannot read", log)
    assert not (res / "cohort" / "metrics.json").exists()
    assert "1 slide(s) failed" in proc.stderr and "bad: infer failed" in proc.stderr
    assert "evaluate.allow_missing: true" in proc.stderr

    # 2. allow_missing: the evaluation runs without bad (which is retried, and fails again)
    set_config(root, "evaluate", allow_missing=True)
    proc = run_snakemake(root, "--cores", "2", "--keep-going", check=False)
    assert proc.returncode != 0
    metrics = json.loads((res / "cohort" / "metrics.json").read_text())
    assert metrics["n_slides"] == 2 and metrics["n_tumor"] == 1
    assert [(m["slide_id"], m["stage"]) for m in metrics["missing"]] == [("bad", "infer")]
    assert metrics["model"]["path"] == "results/model/init.pt" and metrics["model"]["sha256"]
    assert metrics["model_checksums"] == [metrics["model"]["sha256"]]
    assert re.fullmatch(r"[0-9a-f]{16}", metrics["config_checksum"])

    # 3. the slide file is replaced: its record is stale, it is scanned and evaluated
    write_tiff(bad, he_image(1200, 1500, seed=5))
    run_snakemake(root, "--cores", "2")
    assert not (res / "bad" / "FAILED.json").exists()
    metrics = json.loads((res / "cohort" / "metrics.json").read_text())
    assert metrics["n_slides"] == 3 and metrics["missing"] == []

    # 4. a corrupt intermediate: stitch moves it aside and fails ...
    before = read_prob(res / "t1" / "probmap.h5")
    truncate(res / "t1" / "tiles.h5")
    proc = run_snakemake(root, "--cores", "2", check=False)
    assert proc.returncode != 0
    assert (res / "t1" / "tiles.h5.corrupt").is_file() and not (res / "t1" / "tiles.h5").exists()
    assert "moved aside" in (res / "logs" / "stitch" / "t1.log").read_text()
    assert json.loads((res / "t1" / "FAILED.json").read_text())["stage"] == "stitch"
    # ... and the next run regenerates it (infer, stitch, detect), although the older lesions
    # of t1 still exist; the evaluation planned without t1 lists it, the run after includes it
    proc = run_snakemake(root, "--cores", "2")
    assert "rule infer" in proc.stderr and not (res / "t1" / "FAILED.json").exists()
    np.testing.assert_array_equal(read_prob(res / "t1" / "probmap.h5"), before)
    assert [m["slide_id"] for m in json.loads((res / "cohort" / "metrics.json").read_text())[
        "missing"]] == ["t1"]  # fmt: skip
    proc = run_snakemake(root, "--cores", "2")
    assert json.loads((res / "cohort" / "metrics.json").read_text())["missing"] == []
    assert not list(res.rglob("*.tmp")) and not list(res.rglob(".*.tmp"))


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


@pytest.mark.slow
def test_killed_infer_job_is_redone_and_identical(workdir):
    """kill -9 of the ``wsiscan infer`` process of a Snakemake job after its first batches (as
    the out-of-memory killer does): the job fails, leaves no tiles.h5 and no failure record, and
    the end of the run lists it as killed; the next run redoes it, and the maps equal those of
    an uninterrupted run (infer + stitch called directly on the same inputs)."""
    from wsiscan.infer import infer
    from wsiscan.params import InferParams, StitchParams
    from wsiscan.stitch import stitch

    root = workdir
    (root / "slides").mkdir()
    write_tiff(root / "slides" / "k1.tif", he_image(1024, 1280, seed=6))
    write_config(root, ["k1\tslides/k1.tif\t\tnormal\ttest"], infer={"batch_size": 1, "workers": 0})
    set_config(root, "scan", n=4)
    proc = run_snakemake(root, "--cores", "2", "results/k1/rois.h5", "results/model/init.pt")
    log = root / "results" / "logs" / "infer" / "k1.log"

    cmd = [str(BIN / "snakemake"), "--snakefile", str(REPO / "workflow" / "Snakefile")]
    cmd += ["--directory", str(root), "--cores", "2", "results/k1/tiles.h5"]
    sm = subprocess.Popen(
        cmd, cwd=root, env=snakemake_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    killed = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and sm.poll() is None:
            text = log.read_text() if log.exists() else ""
            done = [int(n) for n, total in re.findall(r"\| *(\d+)/(\d+) \[", text) if n != total]
            if any(n > 0 for n in done):
                for pid in _descendants(sm.pid):
                    argv = _cmdline(pid)
                    # `wsiscan infer ...`, or `python -m wsiscan infer ...` once it restarted
                    # itself with the allocator settings (wsiscan.allocator.MALLOC_TUNING)
                    if "infer" in argv and any(a.endswith("wsiscan") for a in argv[:3]):
                        os.kill(pid, signal.SIGKILL)
                        killed = pid
                break
            time.sleep(0.05)
        out, _ = sm.communicate(timeout=120)
    finally:
        if sm.poll() is None:
            sm.kill()
    assert killed, f"infer was not caught half-way:\n{log.read_text() if log.exists() else ''}"
    assert sm.returncode != 0 and "Error in rule infer" in out, out[-3000:]
    assert not (root / "results" / "k1" / "tiles.h5").exists()
    # no failure record (the process was killed), but the end of the run names the job
    assert not (root / "results" / "k1" / "FAILED.json").exists()
    assert "wsiscan: 1 more job(s) failed in this run" in out, out[-3000:]
    assert "infer k1: stopped without a message: killed by the system?" in out

    proc = run_snakemake(root, "--cores", "2", "--rerun-incomplete", "results/k1/probmap.h5")
    assert "rule infer" in proc.stderr
    res = root / "results" / "k1"
    assert not list((root / "results").rglob("*.tmp"))
    assert not list((root / "results").rglob(".*.tmp"))

    ref = root / "reference"
    infer(
        root / "slides" / "k1.tif", res / "rois.h5", root / "results" / "model" / "init.pt",
        ref / "tiles.h5", InferParams(batch_size=1, workers=0, device="cpu"), slide_id="k1",
    )  # fmt: skip
    stitch(
        None, ref / "tiles.h5", res / "tissue.png", ref / "probmap.h5", None,
        StitchParams(threshold=0.5, opening_radius_um=0.0, closing_radius_um=0.0), slide_id="k1",
    )  # fmt: skip
    with h5py.File(res / "tiles.h5") as a, h5py.File(ref / "tiles.h5") as b:
        np.testing.assert_array_equal(a["tiles"][()], b["tiles"][()])
    with h5py.File(res / "probmap.h5") as a, h5py.File(ref / "probmap.h5") as b:
        np.testing.assert_array_equal(a["prob"][()], b["prob"][()])
        np.testing.assert_array_equal(a["mask"][()], b["mask"][()])


# -- issue 15: outputs are never written through a planted link, concurrent writers never mix ------
@pytest.mark.parametrize("planted", ["old-temp-name", "output-name"])
def test_a_planted_symlink_is_never_written_through(capsys, copy, model_pt, tmp_path, planted):
    """A symbolic link at ``<name>.tmp`` (the fixed temporary name of wsiscan 0.1) or at the
    output's own name, pointing outside results/: stitch writes neither target, and its outputs
    end as regular files in the slide's folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = {}
    for out in (copy.probmap, copy.heatmap):
        out.unlink()
        victim = outside / f"{out.name}.victim"
        victim.write_bytes(b"precious data\n")
        victims[out] = victim
        link = out.with_name(out.name + ".tmp") if planted == "old-temp-name" else out
        link.symlink_to(victim)
    rc, err = run_cli(capsys, *stage_args(copy, "stitch", model_pt))
    assert rc == 0, err
    for out, victim in victims.items():
        assert victim.read_bytes() == b"precious data\n", victim
        assert out.is_file() and not out.is_symlink()
        assert (copy.root / "results" / "s1").resolve() in out.resolve().parents
    with h5py.File(copy.probmap) as f:
        assert f["prob"].shape and f.attrs["slide_id"] == "s1"


def _stop_when_writing(proc: subprocess.Popen, folder: Path, name: str) -> bool:
    """SIGSTOP ``proc`` as soon as its temporary file of output ``name`` appears in ``folder``
    (the output is open and being written); False if it finished first."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if list(folder.glob(f"*{name}*.tmp")):
            os.kill(proc.pid, signal.SIGSTOP)
            return True
        time.sleep(0.002)
    return False


def test_concurrent_writers_of_one_output_never_mix(copy, model_pt):
    """Two ``wsiscan stitch`` processes write the same probmap.h5 (an orphaned job still running
    beside its re-run) with different thresholds: the first is stopped while its output is
    open (it renders the heat map inside), the second runs to the end, then the first resumes.
    Both succeed, and the file under the final name is complete and comes from one writer (the
    one that finished last), bit for bit."""
    with h5py.File(copy.probmap) as f:  # what the first writer's settings give
        expected = {k: f[k][()] for k in ("prob", "mask")}
        expected_threshold = f.attrs["threshold"]
    copy.probmap.unlink()
    env = {**snakemake_env(), "PYTHONWARNINGS": "ignore"}

    def start(*extra: str) -> subprocess.Popen:
        argv = [str(a) for a in stage_args(copy, "stitch", model_pt)] + list(extra)
        return subprocess.Popen(
            [str(BIN / "wsiscan"), *argv], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    first = start()
    try:
        stopped = _stop_when_writing(first, copy.probmap.parent, "probmap.h5")
        second = start("--threshold", "0.1")
        out2, _ = second.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
    out1, _ = first.communicate(timeout=300)
    assert stopped, f"the first writer finished before it could be stopped:\n{out1}"
    assert second.returncode == 0, out2
    assert first.returncode == 0, out1  # it finished its own file and renamed it last
    with h5py.File(copy.probmap) as f:
        assert f.attrs["threshold"] == expected_threshold != 0.1
        for key, value in expected.items():
            np.testing.assert_array_equal(f[key][()], value)
    assert not temp_files(copy.probmap.parent)


def test_every_writer_goes_through_fileio():
    """No module of the package writes a file by itself: every output goes through
    wsiscan.fileio (an exclusive temporary file in the output's folder, then an atomic rename),
    and the writers of other libraries get fileio's open file object, never a path. The profile
    installer (it writes outside results/) and fileio itself are the exceptions."""
    import ast

    package = REPO / "scripts" / "wsiscan"
    allowed = {"fileio.py", "profiles.py"}
    path_writes = {"write_text", "write_bytes", "symlink_to", "hardlink_to", "touch"}
    shutil_writes = {"copy", "copyfile", "copy2", "copytree", "move"}
    to_handle = {"savefig": 0, "to_csv": 0, "to_json": 0, "TiffWriter": 0, "imwrite": 0}
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            attr = func.attr if isinstance(func, ast.Attribute) else None
            name = attr or getattr(func, "id", "")
            owner = getattr(getattr(func, "value", None), "id", None)
            where = f"{path.relative_to(package)}:{node.lineno} {name}()"
            modes = [
                a.value
                for a in [*node.args[1:], *(k.value for k in node.keywords if k.arg == "mode")]
                if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
            if attr in path_writes or (owner == "shutil" and attr in shutil_writes):
                found.append(where)
            elif name in ("open", "File") and any(set(m) & set("wax+") for m in modes):
                found.append(f"{where} for writing")
            elif (
                name in to_handle
                or (owner == "torch" and name == "save")
                or (
                    name == "save" and any(k.arg == "format" for k in node.keywords)  # PIL images
                )
            ):
                k = 1 if (owner == "torch" and name == "save") else 0
                target = node.args[k] if len(node.args) > k else None
                if not (isinstance(target, ast.Name) and target.id in ("fh", "out")):
                    found.append(f"{where} to a path")
    assert not found, "write through wsiscan.fileio instead:\n" + "\n".join(found)


# -- issue 15: a file the workflow did not write is never moved -----------------------------------
@pytest.mark.parametrize(
    ("stage", "option", "words"),
    [
        ("stitch", "--tiles", ["tiles file is not a readable HDF5 file"]),
        ("detect", "--probmap", ["probability map is not a readable HDF5 file"]),
        ("infer", "--rois", ["ROI grid file is not a readable HDF5 file"]),
    ],
)
def test_a_slide_given_as_an_intermediate_stays_where_it_is(
    capsys, copy, model_pt, cmu_svs, tmp_path, stage, option, words
):
    """A swapped argument (``wsiscan stitch --tiles my.svs``): an error, and my.svs is neither
    moved, renamed nor changed, also inside a results folder."""
    for folder in (tmp_path / "slides", copy.root / "results" / "s1"):
        folder.mkdir(exist_ok=True)
        mine = folder / "my.svs"
        shutil.copyfile(cmu_svs, mine)
        before = (mine.read_bytes(), mine.stat().st_mtime_ns)
        argv = stage_args(copy, stage, model_pt)
        argv[argv.index(option) + 1] = mine
        rc, err = run_cli(capsys, *argv)
        line = assert_one_line_error(rc, err, stage, "my.svs", *words)
        assert "not a file the workflow wrote: left as it is" in line and "moved" not in line
        assert (mine.read_bytes(), mine.stat().st_mtime_ns) == before
        assert sorted(p.name for p in folder.glob("my.svs*")) == ["my.svs"]


def test_a_damaged_copy_outside_results_stays_where_it_is(capsys, copy, model_pt, tmp_path):
    """A wsiscan tiles file (its own format attribute) copied outside any results folder, with a
    damaged chunk: stitch fails naming it and leaves it there (only files under results/ are
    the workflow's to move)."""
    elsewhere = tmp_path / "backup" / "tiles.h5"
    elsewhere.parent.mkdir()
    shutil.copyfile(copy.tiles, elsewhere)
    spoil_chunk(elsewhere, "tiles")
    data = elsewhere.read_bytes()
    argv = stage_args(copy, "stitch", model_pt)
    argv[argv.index("--tiles") + 1] = elsewhere
    rc, err = run_cli(capsys, *argv)
    line = assert_one_line_error(rc, err, "stitch", "tiles file has unreadable data")
    assert "left as it is" in line and elsewhere.read_bytes() == data
    assert not list(elsewhere.parent.glob("*.corrupt"))


# -- issue 15: jobs that failed without a failure record are listed --------------------------------
SNAKEMAKE_ERRORS = """\
Error in rule infer:
    message: None
    jobid: 5
    output: results/k1/tiles.h5
    log: {root}/results/logs/infer/k1.log (check log file(s) for error details)
    shell:
        wsiscan infer ...
        (command exited with non-zero exit code)
Error in rule check_model:
    jobid: 2
    log: results/logs/check_model/check.log (check log file(s) for error details)
Error in group post:
    message: SLURM-job '1234' failed, SLURM status is: 'OUT_OF_MEMORY'
    log: .snakemake/slurm_logs/group_post/1234.log (check log file(s) for error details)
    jobs:
        rule stitch:
            jobid: 7
            output: results/a/probmap.h5
            log: results/logs/stitch/a.log (check log file(s) for error details)
        rule stitch:
            jobid: 8
            output: results/b/probmap.h5
            log: results/logs/stitch/b.log (check log file(s) for error details)
        rule detect:
            jobid: 9
            log: results/logs/detect/c.log (check log file(s) for error details)
"""


def test_failed_jobs_and_the_end_of_run_report(tmp_path, monkeypatch):
    from wsiscan.dag import KILLED, failed_jobs, failure_report

    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "results" / "logs"
    for rel, text in {
        "infer/k1.log": "k1:  40%|####      | 2/5 [00:01<00:01, 1.9block/s]\n",  # killed
        "check_model/check.log": "wsiscan check_model: error: model file x.pt: not a torch file\n",
        "stitch/a.log": "wsiscan stitch: error: slide 'a' (a.tif): tiles file not found\n",
        "stitch/b.log": "INFO wrote results/b/probmap.h5\nwsiscan stitch: done\n",  # finished
    }.items():
        (logs / rel).parent.mkdir(parents=True, exist_ok=True)
        (logs / rel).write_text(text)
    jobs = failed_jobs(SNAKEMAKE_ERRORS.format(root=tmp_path))
    assert [(j.rule, j.name) for j in jobs] == [
        ("infer", "k1"), ("check_model", "check"), ("stitch", "a"), ("detect", "c"),
    ]  # fmt: skip
    causes = {j.name: j.cause for j in jobs}
    assert causes["k1"] == KILLED and causes["c"] == KILLED  # c never wrote its log
    assert causes["check"] == "model file x.pt: not a torch file"
    # a stale log of an earlier run says nothing about this one
    assert (
        failed_jobs(SNAKEMAKE_ERRORS.format(root=tmp_path), since=time.time() + 60)[2].cause
        == KILLED
    )

    records = {"a": {"stage": "stitch", "cause": "slide 'a' (a.tif): tiles file not found"}}
    report = failure_report(records, ["a"], False, jobs)
    assert "1 slide(s) failed" in report and "a: stitch failed" in report
    assert "3 more job(s) failed in this run" in report
    assert re.search(
        r"infer k1: stopped without a message: killed by the system\? \(out of memory", report
    )
    assert "check_model check: model file x.pt: not a torch file" in report
    assert report.count("stitch") == 1  # a's failure is listed once, b finished
    assert failure_report({}, [], False, []) is None
