"""Inference at cohort scale (issue 18): the infer command loads only what inference needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

#: packages the other stages use and inference does not (each adds import time to every job)
NOT_FOR_INFERENCE = ("scipy", "skimage", "sklearn", "matplotlib", "pandas", "wsiscan.tissue")


def test_infer_command_imports_only_what_inference_needs(tmp_path: Path):
    """``python -m wsiscan infer`` as the rule runs it, up to its first read (a missing rois.h5):
    ``-X importtime`` lists every module it imported; torch and the stage's module but none of
    the other stages' libraries."""
    cmd = [sys.executable, "-X", "importtime", "-m", "wsiscan", "infer"]
    cmd += ["--slide", str(tmp_path / "missing.tif"), "--slide-id", "missing"]
    cmd += ["--rois", str(tmp_path / "rois.h5"), "--model", str(tmp_path / "model.pt")]
    cmd += ["--out-tiles", str(tmp_path / "tiles.h5"), "--device", "cpu"]
    env = {**os.environ, "WSISCAN_MALLOC_TUNING": "0"}  # one interpreter: no allocator restart
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "ROI grid file not found" in proc.stderr.splitlines()[-1]  # in the stage
    loaded = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", proc.stderr, re.M))
    assert {"torch", "wsiscan.dense", "wsiscan.formats.tiles"} <= loaded
    unwanted = sorted(m for m in loaded if m.split(".")[0] in NOT_FOR_INFERENCE)
    unwanted += sorted(m for m in loaded if m in NOT_FOR_INFERENCE)
    assert not unwanted, unwanted
