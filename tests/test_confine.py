"""Detections confined to tissue (issue 21): pen ink on the glass that the network calls tumour
yields no lesion point, no lesion mask and no slide score; tumour at the tissue border is kept.

The slide, its tissue mask and ROI grid are real (tissue_mask, roi_grid on an OpenSlide-read
pyramid); the network is replaced by its output: tiles whose probability is high over a green
pen stroke on the glass (what an untrained or round-1 model does, see the issue) and over a tumour
nest inside the tissue, low elsewhere. stitch and detect then run as in the workflow.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from wsiscan.detect import detect
from wsiscan.formats.rois import read_rois
from wsiscan.formats.tiles import write_tiles
from wsiscan.grid import roi_grid
from wsiscan.params import DetectParams, RoiGridParams, StitchParams, TissueMaskParams
from wsiscan.stitch import stitch
from wsiscan.tissue import tissue_mask

from .test_bad_input import write_tiff

MPP = 1.0
W, H = 2400, 1600
N = 20  # ROI side 884 px, blocks laid every 672 px: the blocks at the tissue border hold glass
#: Tissue: an ellipse (centre x, y and half-axes, level-0 px) on the left of the slide.
TISSUE = (600, 800, 450, 550)
#: A green pen stroke on the glass, 200 um right of the tissue, in a block that holds tissue.
PEN = (1250, 700, 1330, 1250)  # x0, y0, x1, y1
#: A tumour nest inside the tissue, 50 um from its border.
NEST = (900, 750, 1000, 850)


def slide_image() -> np.ndarray:
    """Glass, a pink textured tissue ellipse with dark nuclei, a green pen stroke."""
    rng = np.random.default_rng(4)
    img = np.full((H, W, 3), 244, np.int16) + rng.integers(-3, 4, (H, W, 1), dtype=np.int16)
    yy, xx = np.mgrid[0:H, 0:W]
    cx, cy, ax, ay = TISSUE
    inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1
    pink = np.array([222, 140, 190], np.int16) + rng.integers(-25, 26, (H, W, 3))
    pink[rng.random((H, W)) < 0.02] = (90, 40, 130)
    img[inside] = pink[inside]
    x0, y0, x1, y1 = PEN
    img[y0:y1, x0:x1] = (40, 150, 70)  # green ink: the tissue mask's artefact filter drops it
    return np.clip(img, 0, 255).astype(np.uint8)


def _inside(x, y, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, Path]:
    """The slide with its tissue mask and ROI grid; the pen stroke is not tissue."""
    root = tmp_path_factory.mktemp("confine")
    path = write_tiff(root / "s.tif", slide_image(), mpp=MPP)
    mask = root / "tissue.png"
    tissue_mask(path, mask, root / "qc_tissue.png", TissueMaskParams(), slide_id="s")
    roi_grid(path, mask, root / "rois.h5", RoiGridParams(n=N, alpha=2), slide_id="s")
    return path, root


def network_output(rois: Path, tiles: Path) -> None:
    """Tiles as a network that calls the pen stroke and the nest tumour would write them."""
    grid = read_rois(rois, "s")
    t, sd = grid.geometry.tile_side, grid.geometry.Sd
    rr, cc = np.mgrid[0:t, 0:t]
    model = {
        "model_checksum": "0" * 64,
        "model_arch": "vgg16",
        "model_width": 1.0,
        "model_batchnorm": True,
        "dense_mode": "single",
        "amp": False,
        "device": "cpu",
    }
    with write_tiles(tiles, grid, model) as out:
        for k, (bx, by) in enumerate(grid.grid_xy):
            x, y = ((bx * t + cc) + 0.5) * sd, ((by * t + rr) + 0.5) * sd
            prob = np.full((t, t), 0.05, np.float32)
            prob[_inside(x, y, NEST)] = 0.9
            prob[_inside(x, y, PEN)] = 0.99
            out.write(k, prob[None])


def run(root: Path, slide: Path, params: StitchParams, name: str) -> tuple[dict, np.ndarray]:
    tiles = root / "tiles.h5"
    if not tiles.exists():
        network_output(root / "rois.h5", tiles)
    out = root / name
    stitch(slide, tiles, root / "tissue.png", out / "probmap.h5", out / "heatmap.png", params,
           slide_id="s")  # fmt: skip
    record = detect(
        out / "probmap.h5", out / "lesions.csv", out / "score.json", out / "lesions.geojson",
        out / "lesions.xml", DetectParams(nms_radius_um=100.0), slide_id="s",
    )  # fmt: skip
    points = np.loadtxt(out / "lesions.csv", delimiter=",", skiprows=1, ndmin=2)
    return record, points


def test_the_stroke_is_glass_and_the_grid_covers_it(slide):
    from wsiscan.formats.tissue_mask import read_tissue_mask

    _, root = slide
    grid = read_rois(root / "rois.h5", "s")
    g = grid.geometry
    covers = [
        bx * g.Sr <= PEN[0] and PEN[2] <= (bx + 1) * g.Sr
        and by * g.Sr <= PEN[1] and PEN[3] <= (by + 1) * g.Sr
        for bx, by in grid.grid_xy
    ]  # fmt: skip
    assert any(covers), "the test needs a block over the pen stroke"
    tissue, meta = read_tissue_mask(root / "tissue.png", "s")
    dx, dy = meta["downsample_x"], meta["downsample_y"]
    x0, y0, x1, y1 = PEN
    assert not tissue[int(y0 / dy) : int(y1 / dy), int(x0 / dx) : int(x1 / dx)].any()


def test_pen_ink_on_the_glass_gives_no_lesion_and_no_score(slide):
    path, root = slide
    record, points = run(root, path, StitchParams(), "confined")
    x, y = points[:, 1], points[:, 2]
    assert not _inside(x, y, PEN).any(), points
    assert _inside(x, y, NEST).any(), "tumour at the tissue border is kept"
    assert record["score"] == pytest.approx(0.9)  # the nest, not the ink's 0.99
    with h5py.File(root / "confined" / "probmap.h5") as f:
        assert f.attrs["confine_to_tissue"] and f.attrs["masked_cells"] > 0
        assert f.attrs["masked_max_prob"] == pytest.approx(0.99)
        s = int(f.attrs["stride_px"])
        x0, y0, x1, y1 = (v // s for v in PEN)
        assert not f["prob"][y0 : y1 + 1, x0 : x1 + 1].any()
        assert not f["mask"][y0 : y1 + 1, x0 : x1 + 1].any()
        assert f["masked"][y0 + 1 : y1, x0 + 1 : x1].all()  # the cells whose centre is in the ink
    assert (root / "confined" / "heatmap.png").stat().st_size > 0


def test_without_confinement_the_ink_is_a_lesion(slide):
    """The same tiles with the confinement off: the test above can fail."""
    path, root = slide
    record, points = run(root, path, StitchParams(confine_to_tissue=False), "unconfined")
    assert _inside(points[:, 1], points[:, 2], PEN).any()
    assert record["score"] == pytest.approx(0.99)


def test_the_margin_keeps_cells_near_the_tissue(slide):
    """A margin larger than the stroke's distance to the tissue keeps the stroke."""
    path, root = slide
    record, points = run(root, path, StitchParams(tissue_margin_um=2000.0), "wide_margin")
    assert _inside(points[:, 1], points[:, 2], PEN).any()


def test_confinement_needs_the_tissue_mask(slide, tmp_path):
    from wsiscan.errors import ConfigError

    path, root = slide
    with pytest.raises(ConfigError, match="confine_to_tissue needs the tissue mask"):
        stitch(path, root / "tiles.h5", None, tmp_path / "p.h5", None, StitchParams(),
               slide_id="s")  # fmt: skip
    assert not (tmp_path / "p.h5").exists()
