"""Shared fixtures: repository paths and a runner for real Snakemake invocations."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
BIN = Path(sys.executable).parent
HEADER = "slide_id\tpath\tannotation\tlabel\tsplit\n"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """Real H&E Aperio sample (CMU-1 small region, 2220x2967, 0.499 um/px, public domain)."""
    return DATA / "cmu_small_region.svs"


def snakemake_env() -> dict[str, str]:
    """Environment for Snakemake subprocesses: the test interpreter's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run the repository's workflow with ``workdir`` as working directory."""
    cmd = [
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "workflow" / "Snakefile"),
        "--directory",
        str(workdir),
        *args,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=snakemake_env(), timeout=timeout, cwd=workdir
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh working directory holding a copy of config/ (the workflow reads config/config.yaml)."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    return tmp_path


def write_tiff(path: Path, mpp: float | None) -> Path:
    """A two-level pyramidal JPEG TIFF, with resolution tags only when ``mpp`` is given."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(150, 250, (512, 512, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for k, f in enumerate((1, 2)):
            extra = {}
            if mpp is not None:
                extra = {"resolution": (1e4 / (mpp * f),) * 2, "resolutionunit": "CENTIMETER"}
            tw.write(
                np.ascontiguousarray(rgb[::f, ::f]),
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                subfiletype=1 if k else 0,
                **extra,
            )
    return path


@pytest.fixture(scope="session")
def trained_cohort(tmp_path_factory) -> Path:
    """A tiny cohort run to the end with two training rounds, every round evaluated: demo slides
    for training and test, plus a slide file without a resolution (it needs slide.mpp_fallback).
    Shared by the tests of run-time settings, rounds and training DAG (test_params, test_train);
    a test that edits its config sets it back. ``first_run.log``: Snakemake's output of the run."""
    root = tmp_path_factory.mktemp("trained")
    (root / "config").mkdir()
    (root / "slides").mkdir()
    write_tiff(root / "slides" / "nompp.tif", None)
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["demo"].update(width_px=2500, height_px=2000)
    cfg["scan"]["n"] = 8
    cfg["slide"]["mpp_fallback"] = 0.5
    cfg["infer"].update(workers=0, batch_size=4, device="cpu")
    cfg["evaluate"].update(bootstrap=20, every_round=True)
    cfg["train"].update(
        rounds=2, n_patches=200, epochs=1, finetune_epochs=1, patches_per_epoch=32,
        batch_size=16, val_patches=16, workers=0, threads=1, device="cpu", warmup_steps=1,
    )  # fmt: skip
    cfg["train"]["mine"].update(block_fraction=0.5, workers=0, batch_size=4)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rows = [
        "tt\tdata/demo/tt.tif\tdata/demo/tt.xml\ttumor\ttrain",
        "tn\tdata/demo/tn.tif\t\tnormal\ttrain",
        # s1: a micrometastasis (334 um) at this size, so FROC is defined (st has only an ITC)
        "s1\tdata/demo/s1.tif\tdata/demo/s1.xml\ttumor\ttest",
        "sn\tdata/demo/sn.tif\t\tnormal\ttest",
        "nompp\tslides/nompp.tif\t\tunknown\ttest",
    ]
    (root / "config" / "slides.tsv").write_text(HEADER + "".join(r + "\n" for r in rows))
    proc = run_snakemake(root, "--cores", "2")
    (root / "first_run.log").write_text(proc.stderr)  # the job stats, for the tests to read
    assert (root / "results" / "cohort" / "metrics.json").is_file()
    assert (root / "results" / "train" / "round2" / "model.pt").is_file()
    return root


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``) a test module is one unit of
    work, so its module fixtures are built once; the modules that use the session fixture
    ``trained_cohort`` form one unit together, so it is built once too."""
    shared = {
        i.module.__name__ for i in items if "trained_cohort" in getattr(i, "fixturenames", ())
    }
    for item in items:
        if not any(item.iter_markers("xdist_group")):
            name = item.module.__name__
            item.add_marker(pytest.mark.xdist_group("trained_cohort" if name in shared else name))
