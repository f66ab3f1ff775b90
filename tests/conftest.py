"""Shared fixtures: repository paths and a runner for real Snakemake invocations."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
BIN = Path(sys.executable).parent


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
