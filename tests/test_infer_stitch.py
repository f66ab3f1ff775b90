"""infer + stitch on a small synthetic pyramidal TIFF, checked against the patch classifier.

The slide's pixels are known (a lossless TIFF written here), so the reference builds every patch
itself from a white-padded copy of the image: it checks the block geometry, the tile placement,
the crop at the slide edge and that blocks crossing the slide border read white outside it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch

from wsiscan import __version__
from wsiscan.allocator import (
    JEMALLOC_CONF,
    JEMALLOC_ENV,
    JEMALLOC_SONAME,
    MALLOC_TUNING,
    NO_MALLOC_TUNING_ENV,
    RESTART_VARIABLES,
    find_jemalloc,
    malloc_tuning_applies,
)
from wsiscan.cli import main as cli_main
from wsiscan.dense import patch_classifier
from wsiscan.errors import SlideError
from wsiscan.fileio import sha256_file
from wsiscan.formats import rois as rois_format
from wsiscan.formats import tiles as tiles_format
from wsiscan.formats.checkpoint import load_checkpoint, save_checkpoint
from wsiscan.geometry import Geometry
from wsiscan.infer import infer
from wsiscan.model import ScanNet, to_tensor
from wsiscan.params import InferParams, StitchParams
from wsiscan.stitch import clean_mask, mask_in_strips, stitch

SLIDE_W, SLIDE_H, MPP = 300, 240, 0.5
GEO = Geometry.for_arch("vgg16", n=1, alpha=2)  # Lr 276, Sd 16, Sr 64, block 292, tile 4
MISSING_BLOCK = (2, 1)  # (bx, by) left out of the grid: its cells must stay 0
# the stitch radii the old stitch function defaulted to (StitchParams() defaults to 0 / 0 um)
#: The old command-line radii; these synthetic slides have no tissue mask to confine the map to.
OLD_STITCH_DEFAULTS = StitchParams(
    opening_radius_um=8.0, closing_radius_um=16.0, confine_to_tissue=False
)


def smooth_texture(h: int, w: int, seed: int) -> np.ndarray:
    """RGB uint8 with structure at several scales (so neighbouring patches differ)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3))
    for scale in (4, 16, 64):
        coarse = rng.random((h // scale + 2, w // scale + 2, 3))
        img += np.kron(coarse, np.ones((scale, scale, 1)))[:h, :w]
    img = 255 * (img - img.min()) / (img.max() - img.min())
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 300x240 two-level tiled TIFF (lossless), 0.5 um/px, and its pixels."""
    path = tmp_path_factory.mktemp("slide") / "synthetic.tif"
    img = smooth_texture(SLIDE_H, SLIDE_W, seed=0)
    res = (1e4 / MPP, 1e4 / MPP)  # pixels per cm
    with tifffile.TiffWriter(path) as tif:
        opts = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
        tif.write(img, resolution=res, resolutionunit="CENTIMETER", **opts)
        tif.write(
            np.ascontiguousarray(img[::2, ::2]),
            subfiletype=1,
            resolution=(res[0] / 2, res[1] / 2),
            resolutionunit="CENTIMETER",
            **opts,
        )
    return path, img


@pytest.fixture(scope="module")
def model_file(slide, tmp_path_factory):
    """A slim random model, BN statistics taken from this slide (one train-mode pass) and the
    tumour logit scaled so that probabilities spread over (0, 1): the comparison means something.
    """
    torch.manual_seed(0)
    model = ScanNet(width=0.125)
    _, img = slide
    canvas = np.full((SLIDE_H + 100, SLIDE_W + 100, 3), 255, np.uint8)
    canvas[50 : 50 + SLIDE_H, 50 : 50 + SLIDE_W] = img
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(to_tensor(canvas))
        logits = model.eval()(to_tensor(canvas))
        diff = (logits[:, 1] - logits[:, 0]).flatten()
        a = 2.0 / diff.std()
        w, b = model.head.fc8.weight, model.head.fc8.bias
        w[1] = w[0] + a * (w[1] - w[0])
        b[1] = b[0] + a * (b[1] - b[0]) - a * diff.mean()
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, model, {"test": True})
    return path


def write_rois(path, blocks_bxby, slide_id="synthetic", geometry=GEO, wh=(SLIDE_W, SLIDE_H)):
    """rois.h5 in the documented format, by hand."""
    grid_xy = np.asarray(blocks_bxby, np.int64).reshape(-1, 2)
    level0_xy = geometry.origin + grid_xy * geometry.Sr
    rows, cols = math.ceil(wh[1] / geometry.Sr), math.ceil(wh[0] / geometry.Sr)
    with h5py.File(path, "w") as f:
        f.create_dataset("level0_xy", data=level0_xy)
        f.create_dataset("grid_xy", data=grid_xy)
        f.create_dataset("tissue_fraction", data=np.ones(len(grid_xy), np.float32))
        for key, value in geometry.as_attrs().items():
            f.attrs[key] = value
        f.attrs.update(
            format=rois_format.FORMAT,
            geometry_checksum=geometry.checksum(),
            slide_id=slide_id,
            slide_width=wh[0],
            slide_height=wh[1],
            mpp=MPP,
            mask_level=0,
            mask_downsample_x=16.0,
            mask_downsample_y=16.0,
            min_tissue_fraction=0.0,
            grid_shape=np.array([rows, cols], np.int64),
            wsiscan_version=__version__,
        )
    return path


def all_blocks(skip=()):
    rows, cols = math.ceil(SLIDE_H / GEO.Sr), math.ceil(SLIDE_W / GEO.Sr)
    return [(bx, by) for by in range(rows) for bx in range(cols) if (bx, by) not in skip]


def reference_prob(model, img, cells):
    """Patch classifier at map cells (i, j): the Lf patch with top-left origin + (j, i)*Sd."""
    lf, pad = GEO.Lf, GEO.Lf
    canvas = np.full((img.shape[0] + 2 * pad, img.shape[1] + 2 * pad, 3), 255, np.uint8)
    canvas[pad:-pad, pad:-pad] = img
    patches = []
    for i, j in cells:
        y0, x0 = pad + GEO.origin + i * GEO.Sd, pad + GEO.origin + j * GEO.Sd
        assert y0 >= 0 and x0 >= 0
        patches.append(canvas[y0 : y0 + lf, x0 : x0 + lf])
    x = to_tensor(np.stack(patches))
    return patch_classifier(model, x, stride=lf)[:, 0, 0]


def check_cells(rows, cols, seed=0):
    """Map cells at block corners and borders, the slide edge, and a random sample."""
    T = GEO.tile_side
    cells = set()
    for by in range(math.ceil(rows / T)):
        for bx in range(math.ceil(cols / T)):
            for r in (0, T - 1):
                for c in (0, T - 1):
                    cells.add((min(by * T + r, rows - 1), min(bx * T + c, cols - 1)))
    cells |= {(rows - 1, j) for j in range(0, cols, 3)} | {(i, cols - 1) for i in range(rows)}
    rng = np.random.default_rng(seed)
    cells |= {(int(rng.integers(rows)), int(rng.integers(cols))) for _ in range(10)}
    missing = {
        (MISSING_BLOCK[1] * T + r, MISSING_BLOCK[0] * T + c) for r in range(T) for c in range(T)
    }
    return sorted(cells - missing)


def test_infer_and_stitch_equal_patch_classifier(slide, model_file, tmp_path):
    slide_path, img = slide
    rois = write_rois(tmp_path / "rois.h5", all_blocks(skip=[MISSING_BLOCK]))
    tiles_h5, probmap, qc = (
        tmp_path / "tiles.h5",
        tmp_path / "probmap.h5",
        tmp_path / "qc" / "heatmap.png",
    )
    argv = [
        "infer", "--slide", str(slide_path), "--slide-id", "synthetic", "--rois", str(rois),
        "--model", str(model_file), "--out-tiles", str(tiles_h5), "--batch-size", "3",
        "--workers", "2", "--device", "cpu", "--no-amp",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    argv = [
        "stitch", "--tiles", str(tiles_h5), "--slide", str(slide_path), "--slide-id", "synthetic",
        "--out-probmap", str(probmap), "--out-qc", str(qc), "--threshold", "0.5",
        "--opening-radius-um", "8", "--closing-radius-um", "16",
        "--no-confine-to-tissue",  # the map is compared with the classifier everywhere
    ]  # fmt: skip
    assert cli_main(argv) == 0

    with h5py.File(tiles_h5, "r") as f:
        assert f["tiles"].shape == (len(all_blocks()) - 1, GEO.tile_side, GEO.tile_side)
        assert f["tiles"].dtype == np.float32
        assert f.attrs["model_checksum"] == sha256_file(model_file)
        assert f.attrs["dense_mode"] == "single" and f.attrs["device"] == "cpu"
        assert f.attrs["geometry_checksum"] == GEO.checksum()
        tiles_first = f["tiles"][()]
    with h5py.File(probmap, "r") as f:
        prob, mask = f["prob"][()], f["mask"][()]
        attrs = dict(f.attrs)
    rows, cols = math.ceil(SLIDE_H / GEO.Sd), math.ceil(SLIDE_W / GEO.Sd)
    assert prob.shape == mask.shape == (rows, cols) == (15, 19)
    assert attrs["stride_px"] == GEO.Sd and tuple(attrs["origin_level0_xy"]) == (0, 0)
    assert (attrs["slide_width"], attrs["slide_height"], attrs["mpp"]) == (SLIDE_W, SLIDE_H, MPP)
    assert attrs["slide_id"] == "synthetic" and attrs["model_checksum"] == sha256_file(model_file)
    assert attrs["opening_radius_cells"] == 1 and attrs["closing_radius_cells"] == 2
    assert (attrs["opening_radius_um"], attrs["closing_radius_um"]) == (8.0, 16.0)

    model, _ = load_checkpoint(model_file)
    cells = check_cells(rows, cols)
    ref = reference_prob(model, img, cells)
    got = np.array([prob[i, j] for i, j in cells])
    assert ref.std() > 0.05  # probabilities spread out, so the comparison means something
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)

    T = GEO.tile_side
    bx, by = MISSING_BLOCK
    assert np.all(prob[by * T : (by + 1) * T, bx * T : (bx + 1) * T] == 0)
    assert np.all(prob[: by * T] > 0) and np.all(prob[(by + 1) * T :] > 0)
    np.testing.assert_array_equal(mask, clean_mask(prob, 0.5, 1, 2).astype(np.uint8))
    assert qc.stat().st_size > 10_000 and qc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for folder in (tmp_path, qc.parent):
        assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))

    # same inputs -> same tiles; shift-and-stitch, another batch size and no workers agree
    subset = all_blocks(skip=[MISSING_BLOCK])[:7]
    rois = write_rois(tmp_path / "rois_subset.h5", subset)
    params = InferParams(batch_size=3, workers=2, device="cpu")
    infer(slide_path, rois, model_file, tiles_h5, params, slide_id="synthetic")
    with h5py.File(tiles_h5, "r") as f:
        tiles_first = f["tiles"][()]
    again = tmp_path / "again.h5"
    infer(slide_path, rois, model_file, again, params, slide_id="synthetic")
    shift = tmp_path / "shift.h5"
    shift_params = InferParams(
        batch_size=5, workers=0, device="cpu", dense_mode="shift", tile_dtype="float16"
    )
    infer(slide_path, rois, model_file, shift, shift_params, slide_id="synthetic")
    with h5py.File(again, "r") as f:
        np.testing.assert_array_equal(f["tiles"][()], tiles_first)
    with h5py.File(shift, "r") as f:
        assert f["tiles"].dtype == np.float16 and f.attrs["dense_mode"] == "shift"
        np.testing.assert_allclose(f["tiles"][()], tiles_first, rtol=0, atol=1e-3)


def test_border_block_reads_white_outside(slide, model_file, tmp_path):
    """Block (0, 0) starts at origin -114: its patches are mostly white outside the slide."""
    slide_path, img = slide
    rois = write_rois(tmp_path / "rois.h5", [(0, 0)])
    tiles_h5 = tmp_path / "tiles.h5"
    infer(slide_path, rois, model_file, tiles_h5, InferParams(workers=0), slide_id="synthetic")
    with h5py.File(tiles_h5, "r") as f:
        tile = f["tiles"][0]
    model, _ = load_checkpoint(model_file)
    T = GEO.tile_side
    cells = [(r, c) for r in range(T) for c in range(T)]
    np.testing.assert_allclose(tile.ravel(), reference_prob(model, img, cells), rtol=0, atol=1e-5)
    # and the same patches on a black surround differ: the white padding matters
    black = np.zeros((img.shape[0] + 2 * GEO.Lf, img.shape[1] + 2 * GEO.Lf, 3), np.uint8)
    black[GEO.Lf : -GEO.Lf, GEO.Lf : -GEO.Lf] = img
    y0 = GEO.Lf + GEO.origin
    x = to_tensor(black[None, y0 : y0 + GEO.Lf, y0 : y0 + GEO.Lf])
    assert abs(patch_classifier(model, x, stride=GEO.Lf)[0, 0, 0] - tile[0, 0]) > 1e-3


def test_zero_blocks(slide, model_file, tmp_path):
    slide_path, _ = slide
    rois = write_rois(tmp_path / "rois.h5", [])
    tiles_h5, probmap, qc = tmp_path / "tiles.h5", tmp_path / "probmap.h5", tmp_path / "qc.png"
    summary = infer(slide_path, rois, model_file, tiles_h5, InferParams(), slide_id="synthetic")
    assert summary["blocks"] == 0
    with h5py.File(tiles_h5, "r") as f:
        assert f["tiles"].shape == (0, GEO.tile_side, GEO.tile_side)
    result = stitch(
        slide_path, tiles_h5, None, probmap, qc, OLD_STITCH_DEFAULTS, slide_id="synthetic"
    )
    assert result["tiles"] == 0 and result["mask_cells"] == 0
    with h5py.File(probmap, "r") as f:
        assert f["prob"].shape == (15, 19) and not f["prob"][()].any() and not f["mask"][()].any()
    assert qc.is_file()


def test_infer_errors_leave_no_output(slide, model_file, tmp_path, capsys):
    slide_path, _ = slide
    out = tmp_path / "tiles.h5"
    wrong_size = write_rois(tmp_path / "rois_big.h5", [(0, 0)], wh=(SLIDE_W + 64, SLIDE_H))
    no_workers = InferParams(workers=0)
    with pytest.raises(SlideError, match="300x240"):
        infer(slide_path, wrong_size, model_file, out, no_workers, slide_id="synthetic")
    other = write_rois(tmp_path / "rois_other.h5", [(0, 0)], slide_id="other")
    with pytest.raises(SlideError, match="other"):
        infer(slide_path, other, model_file, out, no_workers, slide_id="synthetic")
    rois = write_rois(tmp_path / "rois.h5", [(0, 0)])
    bad_model = tmp_path / "bad.pt"
    bad_model.write_bytes(b"\x00" * 64)
    code = cli_main(
        ["infer", "--slide", str(slide_path), "--slide-id", "synthetic", "--rois", str(rois),
         "--model", str(bad_model), "--out-tiles", str(out), "--workers", "0"]
    )  # fmt: skip
    assert code == 1 and "bad.pt" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    assert not list(tmp_path.glob(".*.tmp"))


def _infer_command(slide_path, rois, model_file, out) -> list:
    wsiscan = Path(sys.executable).with_name("wsiscan")
    return [wsiscan, "infer", "--slide", slide_path, "--slide-id", "synthetic", "--rois", rois,
            "--model", model_file, "--out-tiles", out, "--workers", "0", "--device", "cpu"]  # fmt: skip


def _clean_env() -> dict[str, str]:
    """This environment without the variables the command sets when it restarts itself."""
    return {k: v for k, v in os.environ.items() if k not in {*RESTART_VARIABLES, JEMALLOC_ENV}}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_infer_command_restarts_with_malloc_settings(slide, model_file, tmp_path):
    """The ``wsiscan`` command of a torch stage runs with the allocator settings in its
    environment (one restart of itself), unless switched off; the tiles are the same."""
    slide_path, _ = slide
    rois = write_rois(tmp_path / "rois.h5", all_blocks())
    tiles = {}
    for tuning in ("1", "0"):
        out = tmp_path / f"tiles{tuning}.h5"
        res = subprocess.run(
            _infer_command(slide_path, rois, model_file, out),
            env=_clean_env() | {NO_MALLOC_TUNING_ENV: tuning, JEMALLOC_ENV: "0"},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        settings = re.search(r"allocator: glibc malloc, settings (.*)", res.stderr).group(1)
        assert settings == (str(MALLOC_TUNING) if tuning == "1" else "defaults"), res.stderr
        with h5py.File(out, "r") as f:
            tiles[tuning] = f["tiles"][:]
    assert np.array_equal(tiles["1"], tiles["0"])
    assert malloc_tuning_applies("train_round", {}) and not malloc_tuning_applies("stitch", {})
    assert not malloc_tuning_applies("infer", {"MALLOC_TRIM_THRESHOLD_": "1"})  # the user's own


@pytest.fixture(scope="module")
def jemalloc_library(tmp_path_factory) -> str:
    """The real jemalloc: the system's if installed, else Debian's libjemalloc2 unpacked into a
    temporary folder (``apt-get download`` needs no root); skip where neither is possible."""
    found = find_jemalloc({})
    if found:
        return found
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("no jemalloc installed and no apt-get to fetch Debian's libjemalloc2")
    folder = tmp_path_factory.mktemp("jemalloc")
    subprocess.run(["apt-get", "download", "libjemalloc2"], cwd=folder, capture_output=True,
                   timeout=300, check=False)  # fmt: skip
    debs = sorted(folder.glob("libjemalloc2_*.deb"))
    if not debs:
        pytest.skip("apt-get could not download libjemalloc2")
    subprocess.run(["dpkg-deb", "-x", debs[0], folder / "root"], check=True)
    return str(next((folder / "root").rglob(JEMALLOC_SONAME)))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="LD_PRELOAD of glibc's linker")
def test_infer_command_preloads_jemalloc(slide, model_file, jemalloc_library, tmp_path):
    """With jemalloc, ``wsiscan infer`` runs on it (mapped into the process, page decay off) and
    writes the same tiles as on glibc's malloc; a wrong ``WSISCAN_JEMALLOC`` is one error line
    with a failure record, before any work."""
    slide_path, _ = slide
    rois = write_rois(tmp_path / "rois.h5", all_blocks())
    tiles = {}
    for kind, library in (("jemalloc", jemalloc_library), ("glibc", "0")):
        out = tmp_path / f"tiles_{kind}.h5"
        res = subprocess.run(
            _infer_command(slide_path, rois, model_file, out),
            env=_clean_env() | {JEMALLOC_ENV: library}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        used = re.search(r"allocator: (.*)", res.stderr).group(1)
        if kind == "jemalloc":
            mapped = used.removeprefix("jemalloc ").split(",")[0]
            assert Path(mapped).name == JEMALLOC_SONAME, used
            assert used.endswith(f"MALLOC_CONF={JEMALLOC_CONF}"), used
        else:
            assert used.startswith("glibc malloc"), used
        with h5py.File(out, "r") as f:
            tiles[kind] = f["tiles"][:]
    assert np.array_equal(tiles["jemalloc"], tiles["glibc"])

    record = tmp_path / "FAILED.json"
    missing = tmp_path / "no" / JEMALLOC_SONAME
    wsiscan, *stage = _infer_command(slide_path, rois, model_file, tmp_path / "x.h5")
    res = subprocess.run(
        [wsiscan, "--failure-record", record, *stage],
        env=_clean_env() | {JEMALLOC_ENV: str(missing)}, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"wsiscan infer: error: {JEMALLOC_ENV}={str(missing)!r}: no such file "
        f"(a path to {JEMALLOC_SONAME}, or 0 for glibc's malloc)"
    )
    assert JEMALLOC_ENV in json.loads(record.read_text())["cause"]
    assert not (tmp_path / "x.h5").exists()


def test_mask_in_strips_equals_whole_map():
    rng = np.random.default_rng(0)
    prob = rng.random((97, 61)).astype(np.float32)
    prob[20:50, 10:40] += 0.4  # a lesion-like blob
    for open_r, close_r in [(0, 0), (1, 2), (2, 1), (3, 3)]:
        whole = clean_mask(prob, 0.6, open_r, close_r).astype(np.uint8)
        for strip in (1, 7, 30, 200):
            out = np.zeros_like(whole)
            total = mask_in_strips(prob, out, 0.6, open_r, close_r, strip)
            np.testing.assert_array_equal(out, whole)
            assert total == whole.sum()


def test_stitch_strips_and_edge_crop(slide, model_file, tmp_path):
    """Small strips give the same map; tiles are cropped at the slide's right/bottom edge."""
    slide_path, _ = slide
    rois = write_rois(tmp_path / "rois.h5", all_blocks())
    tiles_h5 = tmp_path / "tiles.h5"
    # a stand-in tiles.h5 with known values: tile k is filled with k / N (no model needed)
    with h5py.File(rois, "r") as src, h5py.File(tiles_h5, "w") as f:
        n = src["grid_xy"].shape[0]
        for key, value in src.attrs.items():
            f.attrs[key] = value
        f.attrs["format"] = tiles_format.FORMAT
        f.attrs["model_checksum"] = "0" * 64
        f["grid_xy"] = src["grid_xy"][()]
        f["level0_xy"] = src["level0_xy"][()]
        T = GEO.tile_side
        values = (np.arange(n, dtype=np.float32) + 1) / n
        f["tiles"] = np.repeat(values, T * T).reshape(n, T, T)
        grid = src["grid_xy"][()]
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    stitch(None, tiles_h5, None, a, None, OLD_STITCH_DEFAULTS, slide_id="synthetic", strip_rows=1)
    stitch(
        None, tiles_h5, None, b, None, OLD_STITCH_DEFAULTS, slide_id="synthetic", strip_rows=10_000
    )
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        pa, pb = fa["prob"][()], fb["prob"][()]
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_array_equal(fa["mask"][()], fb["mask"][()])
    T = GEO.tile_side
    for k, (bx, by) in enumerate(grid):
        block = pa[by * T : (by + 1) * T, bx * T : (bx + 1) * T]
        assert block.size and np.all(block == values[k])
    assert pa.shape == (15, 19) and np.all(pa > 0)  # last row/column cropped, nothing missing
    with pytest.raises(SlideError, match="belongs to slide"):
        stitch(None, tiles_h5, None, a, None, OLD_STITCH_DEFAULTS, slide_id="other")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_infer_on_cuda_matches_cpu(slide, model_file, tmp_path):
    """CUDA float32 (TF32 off) equals the CPU tiles up to float32 rounding; repeat runs are
    identical; AMP (bf16) is close but not exact."""
    slide_path, _ = slide
    rois = write_rois(tmp_path / "rois.h5", all_blocks())
    run = InferParams(batch_size=4, workers=2)
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic)
    for name, params in {
        "cpu": run.replace(device="cpu"),
        "gpu": run.replace(device="cuda"),
        "gpu2": run.replace(device="cuda"),
        "amp": run.replace(device="cuda", amp=True),
    }.items():
        infer(slide_path, rois, model_file, tmp_path / f"{name}.h5", params, slide_id="synthetic")
    tiles = {}
    for name in ("cpu", "gpu", "gpu2", "amp"):
        with h5py.File(tmp_path / f"{name}.h5", "r") as f:
            tiles[name] = f["tiles"][()]
            assert f.attrs["device"] == ("cpu" if name == "cpu" else "cuda")
            assert bool(f.attrs["amp"]) is (name == "amp")
    # float32 on two devices: different kernels, so agreement up to float32 rounding (1.5e-5
    # measured on an H100); on one device single pass and shift-and-stitch agree to ~1e-7
    np.testing.assert_allclose(tiles["gpu"], tiles["cpu"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(tiles["gpu2"], tiles["gpu"])
    # bf16 is not exact; this test model amplifies a small logit difference ~30x, so only the
    # typical deviation is bounded (a random full-width model deviates by ~2e-3 at most)
    dev_amp = np.abs(tiles["amp"] - tiles["cpu"])
    assert np.median(dev_amp) < 0.05, (float(np.median(dev_amp)), float(dev_amp.max()))
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic) == flags
