"""wsiscan as a Snakemake module of another workflow, from a clone in another folder.

The calling workflow is what ``snakedeploy deploy-workflow`` writes (``workflow/Snakefile`` with a
``module`` and ``use rule * from wsiscan``, the config copied into ``config/``), with the
module's ``snakefile:`` pointing at a copy of this repository elsewhere. The copy's package is
marked (its ``__version__``), so the test sees which package the jobs ran: the clone's, not the
one installed in the venv. A dry run plans the whole cohort; the first stages then run on two
small demo slides, without PYTHONPATH, and ``--report`` finds the module's captions.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import pytest

from .conftest import BIN, REPO, snakemake_env
from .test_rerun import job_stats, write_small_demo

pytestmark = pytest.mark.slow

MARK = "0.1.0+module-test"


def clone_elsewhere(dest: Path) -> Path:
    """A copy of the repository's workflow, package and config whose package says ``MARK``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in ("workflow", "scripts", "config"):
        shutil.copytree(REPO / part, dest / part, ignore=ignore)
    init = dest / "scripts" / "wsiscan" / "__init__.py"
    init.write_text(init.read_text() + f"\n__version__ = {MARK!r}\n")
    return dest


def calling_workflow(root: Path, clone: Path) -> Path:
    """A workflow in ``root`` that uses every rule of the clone's workflow as module ``wsiscan``."""
    (root / "workflow").mkdir(parents=True)
    (root / "workflow" / "Snakefile").write_text(
        'configfile: "config/config.yaml"\n\n\n'
        "module wsiscan:\n"
        "    snakefile:\n"
        f'        "{clone / "workflow" / "Snakefile"}"\n'
        "    config:\n"
        "        config\n\n\n"
        "use rule * from wsiscan\n"
    )
    write_small_demo(root, [("t1", "tumor"), ("n1", "normal")])
    return root


def snakemake(root: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake in ``root`` as a user runs it there (it finds workflow/Snakefile itself), with
    no PYTHONPATH: the module brings its own package."""
    env = snakemake_env()
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(BIN / "snakemake"), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_workflow_runs_as_a_module_of_another_workflow(tmp_path: Path):
    clone = clone_elsewhere(tmp_path / "elsewhere" / "wsiscan")
    root = calling_workflow(tmp_path / "project", clone)

    dry = snakemake(root, "--cores", "2", "--dry-run")
    assert job_stats(dry.stdout + dry.stderr) == {
        "synth_slide": 2,
        "tissue_mask": 2,
        "roi_grid": 2,
        "init_model": 1,
        "check_model": 1,
        "infer": 2,
        "stitch": 2,
        "detect": 2,
        "evaluate": 1,
        "summarise": 1,
        "all": 1,
    }

    targets = [f"results/{sid}/rois.h5" for sid in ("t1", "n1")]
    run = snakemake(root, "--cores", "2", *targets)
    assert job_stats(run.stderr) == {"synth_slide": 2, "tissue_mask": 2, "roi_grid": 2}
    for sid in ("t1", "n1"):
        with h5py.File(root / "results" / sid / "rois.h5", "r") as fh:
            assert fh.attrs["wsiscan_version"] == MARK  # the jobs ran the clone's package
        assert (root / "results" / sid / "qc" / "tissue.png").is_file()
    assert (root / "data" / "demo" / "t1.tif").is_file()  # the demo slides land in the project
    assert not list(clone.rglob("results")), "nothing is written into the module's clone"

    # the report finds the captions of the module's rules (paths relative to its rule files)
    snakemake(root, "--cores", "1", "--report", "report.html", *targets)
    report = (root / "report.html").read_text(errors="replace")
    caption = r"whose\s+output\s+footprint\s+touches\s+this\s+mask"  # workflow/report/tissue.rst
    assert re.search(caption, (REPO / "workflow" / "report" / "tissue.rst").read_text())
    assert re.search(caption, report), "the tissue caption is missing"
    assert os.path.getsize(root / "report.html") > 10_000
