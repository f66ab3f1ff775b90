"""Tissue mask: the pure thresholding rule, the stage on real slides, metadata and QC files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from skimage import draw

from wsiscan.cli import main
from wsiscan.errors import ConfigError, SlideError
from wsiscan.formats.rois import read_rois
from wsiscan.formats.tissue_mask import MASK_META_TYPES, read_tissue_mask
from wsiscan.grid import roi_grid
from wsiscan.params import RoiGridParams, TissueMaskParams
from wsiscan.slide import open_slide
from wsiscan.tissue import QC_OUTLINE_RGB, hsv_features, read_low_res, segment_tissue, tissue_mask

DATA = Path(__file__).parent / "data"
CMU = DATA / "cmu_small_region.svs"

PINK = (232, 150, 192)  # eosin-stained stroma at low resolution
PURPLE = (150, 90, 170)  # haematoxylin-rich (nuclei-dense) tissue
PEN_BLUE = (40, 70, 160)
PEN_GREEN = (40, 140, 70)
PEN_TEAL = (30, 130, 140)
PEN_BLACK = (25, 25, 30)


def _background(shape: tuple[int, int], seed: int = 0, tint=(243, 242, 240)) -> np.ndarray:
    """Glass background with scanner noise."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 2.0, (*shape, 3))
    return np.clip(np.asarray(tint, float) + noise, 0, 255).astype(np.uint8)


def _paint_tissue(rgb: np.ndarray, center: tuple[int, int], radii: tuple[int, int], seed: int = 1):
    """An H&E-like ellipse: pink stroma with purple nuclei-dense spots. Returns its mask."""
    rng = np.random.default_rng(seed)
    rr, cc = draw.ellipse(*center, *radii, shape=rgb.shape[:2])
    region = np.zeros(rgb.shape[:2], bool)
    region[rr, cc] = True
    spots = rng.random(rgb.shape[:2]) < 0.25
    colour = np.where(spots[..., None], PURPLE, PINK).astype(float)
    colour += rng.normal(0, 6, colour.shape)
    rgb[region] = np.clip(colour[region], 0, 255).astype(np.uint8)
    return region


def _pen_and_dust(rgb: np.ndarray, seed: int = 2) -> np.ndarray:
    """Thick pen strokes (blue, green, teal, black; blurred edges) and dust specks. Returns the
    mask of what was drawn."""
    h, w = rgb.shape[:2]
    drawn = np.zeros((h, w), bool)
    layer = rgb.astype(float)
    strokes = [
        (PEN_BLUE, (10, 10), (60, 180)),
        (PEN_GREEN, (150, 20), (120, 190)),
        (PEN_TEAL, (80, 150), (190, 150)),
        (PEN_BLACK, (190, 10), (100, 60)),
    ]
    for colour, (r0, c0), (r1, c1) in strokes:
        line = np.zeros((h, w), bool)
        rr, cc = draw.line(r0, c0, r1, c1)
        line[np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)] = True
        line = ndi.binary_dilation(line, iterations=2)  # ~5 px = 40 um wide at 8 um/px
        soft = ndi.gaussian_filter(line.astype(float), 0.8)[..., None]
        layer = layer * (1 - soft) + np.asarray(colour, float) * soft
        drawn |= soft[..., 0] > 0.05
    rng = np.random.default_rng(seed)
    for _ in range(25):  # dust: small dark or brownish specks
        r, c = rng.integers(0, h), rng.integers(0, w)
        colour = (90, 88, 92) if rng.random() < 0.5 else (120, 96, 80)
        rr, cc = draw.disk((r, c), rng.uniform(0.8, 2.2), shape=(h, w))
        layer[rr, cc] = colour
        drawn[rr, cc] = True
    rgb[:] = np.clip(np.rint(layer), 0, 255).astype(np.uint8)
    return drawn


def mask_of(rgb: np.ndarray, mpp: float, **settings) -> np.ndarray:
    """The tissue mask of ``rgb`` with the config defaults except ``settings``."""
    return segment_tissue(rgb, mpp, TissueMaskParams(**settings))[0]


def make_mask(slide: Path, out_mask: Path, out_qc: Path, slide_id: str, **settings) -> dict:
    """Stage ``tissue_mask`` with the config defaults except ``settings``; its metadata."""
    return tissue_mask(slide, out_mask, out_qc, TissueMaskParams(**settings), slide_id=slide_id)


def write_pyramid(path: Path, level0: np.ndarray, mpp: float, factors=(1, 4, 16)) -> Path:
    """OpenSlide-readable generic TIFF: one page per level, 256 px JPEG tiles, resolution in cm."""
    with tifffile.TiffWriter(path) as tw:
        for k, f in enumerate(factors):
            res = 1e4 / (mpp * f)
            tw.write(
                level0[::f, ::f],
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
            )
    return path


# -- the pure rule -------------------------------------------------------------------------------
def test_hsv_features_match_skimage():
    from skimage.color import rgb2hsv

    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 128, 128]]
    ours = np.stack(hsv_features(rgb), axis=-1)
    np.testing.assert_allclose(ours, rgb2hsv(rgb), atol=1e-6)


@pytest.mark.parametrize("method", ["saturation", "grey", "both", "either"])
def test_tissue_found_on_background(method):
    rgb = _background((200, 240))
    truth = _paint_tissue(rgb, (100, 110), (60, 80))
    mask = mask_of(rgb, 8.0, method=method)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95, iou


@pytest.mark.parametrize("method", ["saturation", "grey", "both", "either"])
@pytest.mark.parametrize(
    "tint", [(255, 255, 255), (243, 242, 240), (236, 232, 214), (215, 215, 215)]
)
def test_blank_slide_gives_empty_mask(method, tint):
    """White, bright, yellowish and dim-grey glass with noise: no contrast, no tissue."""
    rgb = _background((150, 200), tint=tint)
    mask, info = segment_tissue(rgb, 8.0, TissueMaskParams(method=method))
    assert not mask.any(), info


def test_constant_image_gives_empty_mask():
    assert not mask_of(np.full((30, 30, 3), 255, np.uint8), 8.0).any()
    assert not mask_of(np.zeros((30, 30, 3), np.uint8), 8.0, method="grey").any()


@pytest.mark.parametrize("method", ["saturation", "both"])
def test_pen_marks_and_dust_on_white_are_not_tissue(method):
    rgb = _background((200, 200), seed=3)
    drawn = _pen_and_dust(rgb)
    assert drawn.sum() > 1500  # the artefacts are substantial
    mask = mask_of(rgb, 8.0, method=method)
    assert not mask.any(), mask.sum()


def test_pen_filter_is_what_removes_the_pen():
    """Without the artefact filter the same strokes become tissue (the test can fail)."""
    rgb = _background((200, 200), seed=3)
    _pen_and_dust(rgb)
    assert mask_of(rgb, 8.0, artefact_filter=False).sum() > 500


def test_pen_beside_tissue_is_excluded():
    rgb = _background((240, 320), seed=4)
    truth = _paint_tissue(rgb, (120, 200), (70, 90))
    pen = np.zeros(rgb.shape[:2], bool)
    pen[20:200, 30:38] = True  # a blue stroke well away from the tissue
    rgb[pen] = PEN_BLUE
    mask = mask_of(rgb, 8.0)
    assert not (mask & pen).any()
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95


def test_morphology_sizes_are_in_micrometres():
    """The same physical scene at 8 and 4 um/px: same pieces kept, same holes filled."""

    def scene(mpp: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        s = 8.0 / mpp  # pixels per 8 um
        h, w = int(160 * s), int(260 * s)
        rgb = _background((h, w), seed=5)
        rgb[:] = 243
        parts = {}
        # big piece (~0.9 mm^2) with a small hole (~64x64 um = 4096 um^2) and a large hole
        rgb[int(20 * s) : int(140 * s), int(20 * s) : int(140 * s)] = PINK
        parts["small_hole"] = (slice(int(40 * s), int(48 * s)), slice(int(40 * s), int(48 * s)))
        parts["big_hole"] = (slice(int(70 * s), int(110 * s)), slice(int(70 * s), int(110 * s)))
        for key in ("small_hole", "big_hole"):
            rgb[parts[key]] = 243
        # a small piece: 12x12 px = 96x96 um = 9216 um^2 < 20000 um^2
        parts["small_piece"] = (slice(int(60 * s), int(72 * s)), slice(int(200 * s), int(212 * s)))
        # a piece of 24x24 px = 192x192 um = 36864 um^2 > 20000 um^2
        parts["big_piece"] = (slice(int(100 * s), int(124 * s)), slice(int(190 * s), int(214 * s)))
        for key in ("small_piece", "big_piece"):
            rgb[parts[key]] = PINK
        mask = mask_of(rgb, mpp, closing_diameter_um=0, min_area_um2=20_000, hole_area_um2=50_000)
        return mask, parts

    for mpp in (8.0, 4.0):
        mask, parts = scene(mpp)
        assert mask[parts["small_hole"]].all(), mpp  # 4096 um^2 < 50000: filled
        assert not mask[parts["big_hole"]].any(), mpp  # 102400 um^2: kept open
        assert not mask[parts["small_piece"]].any(), mpp  # dust-sized: dropped
        assert mask[parts["big_piece"]].all(), mpp


def test_closing_bridges_gaps_narrower_than_the_closing_diameter():
    rgb = np.full((100, 160, 3), 243, np.uint8)
    rgb[20:80, 20:78] = PINK
    rgb[20:80, 82:140] = PINK  # 4 px = 32 um gap
    bridged = mask_of(rgb, 8.0, closing_diameter_um=50, min_area_um2=0, hole_area_um2=0)
    assert bridged[25:75, 78:82].all()  # (disk closing rounds the corners)
    open_ = mask_of(rgb, 8.0, closing_diameter_um=16, min_area_um2=0, hole_area_um2=0)
    assert not open_[20:80, 78:82].any()


def test_invalid_arguments():
    rgb = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ConfigError, match=r"tissue\.method: must be one of .*'otsu'"):
        TissueMaskParams(method="otsu")
    with pytest.raises(ValueError, match="mpp"):
        segment_tissue(rgb, 0.0)
    with pytest.raises(ValueError, match="uint8"):
        segment_tissue(rgb.astype(float), 8.0)


# -- the stage on real files ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def cmu_mask(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmu")
    meta = make_mask(CMU, out / "tissue.png", out / "qc" / "tissue.png", "cmu")
    return out, meta


def test_cmu_mask_plausible(cmu_mask, caplog):
    out, meta = cmu_mask
    mask, read_meta = read_tissue_mask(out / "tissue.png")
    # measured 0.388 (QC picture checked by eye: the pink/purple strip, its detached strand and
    # the fragments at the top are inside the outline, the glass outside)
    assert 0.33 < read_meta["tissue_fraction"] < 0.45
    assert read_meta["tissue_fraction"] == pytest.approx(mask.mean())
    # single-level 0.499 um/px slide: level 0 block-averaged x16 to ~8 um/px
    assert read_meta["level"] == 0 and read_meta["reduce_factor"] == 16
    assert read_meta["downsample_x"] == read_meta["downsample_y"] == 16.0
    assert read_meta["mask_mpp"] == pytest.approx(0.499 * 16)
    assert read_meta["slide_mpp"] == pytest.approx(0.499)  # resolved once, here
    assert mask.shape == (186, 139)  # ceil(2967/16), ceil(2220/16)
    assert (read_meta["slide_width"], read_meta["slide_height"]) == (2220, 2967)
    for key, typ in MASK_META_TYPES.items():
        assert isinstance(read_meta[key], typ), key
        assert read_meta[key] == meta[key], key  # text chunks round-trip exactly
    # the left glass margin is background, the centre of the strip is tissue
    assert not mask[:50, :30].any() and not mask[-40:, :20].any()
    assert mask[150, 60]


def test_cmu_qc_picture(cmu_mask):
    out, _ = cmu_mask
    qc = np.asarray(Image.open(out / "qc" / "tissue.png"))
    assert qc.ndim == 3 and qc.shape[2] == 3
    assert 600 <= max(qc.shape[:2]) <= 1500
    outline = np.all(qc == QC_OUTLINE_RGB, axis=-1)
    assert 0.002 < outline.mean() < 0.1


def test_pyramid_level_chosen_by_mpp_not_index(tmp_path):
    """A 3-level TIFF at 0.5 um/px (downsamples 1, 4, ~16): the ~8 um/px level is read as is."""
    level0 = np.full((2000, 3000, 3), 243, np.uint8)
    rr, cc = draw.ellipse(1000, 1500, 600, 900, shape=level0.shape[:2])
    level0[rr, cc] = PINK
    slide = write_pyramid(tmp_path / "s.tif", level0, 0.5)
    meta = make_mask(slide, tmp_path / "m.png", tmp_path / "qc.png", "s")
    assert meta["level"] == 2 and meta["reduce_factor"] == 1
    assert meta["downsample_x"] == pytest.approx(3000 / 188)  # non-integer: 188 px wide level
    assert meta["downsample_y"] == pytest.approx(2000 / 125)
    mask, _ = read_tissue_mask(tmp_path / "m.png")
    assert mask.shape == (125, 188)
    assert meta["tissue_fraction"] == pytest.approx(np.pi * 600 * 900 / 6e6, rel=0.05)
    # a coarser target picks a coarser level; a finer one reads level 1 and block-averages it
    meta = make_mask(slide, tmp_path / "m2.png", tmp_path / "qc2.png", "s", target_mpp=3.5)
    assert meta["level"] == 1 and meta["reduce_factor"] == 2
    assert meta["downsample_x"] == pytest.approx(8.0)  # 2 um/px level, x2
    assert read_tissue_mask(tmp_path / "m2.png")[0].shape == (250, 375)


def test_banded_reduction_equals_one_pass():
    """Reading a single-level slide in many bands gives the same thumbnail as one band."""
    with open_slide(CMU) as slide:
        whole, info = read_low_res(slide, 8.0)
        banded, info_b = read_low_res(slide, 8.0, band_bytes=3 * 2220 * 160)  # 160-row bands
    assert info == info_b and info["reduce_factor"] == 16
    assert whole.shape == (186, 139, 3)
    np.testing.assert_array_equal(whole, banded)
    # independent check: 16x16 means with white padding (2967 = 185*16 + 7, 2220 = 138*16 + 12)
    level0 = np.full((186 * 16, 139 * 16, 3), 255, np.float64)
    with open_slide(CMU) as slide:
        slide_rgb = slide.read_rgb((0, 0), 0, (2220, 2967))
    level0[:2967, :2220] = slide_rgb
    expected = level0.reshape(186, 16, 139, 16, 3).mean(axis=(1, 3))
    assert np.abs(whole - expected).max() <= 0.5 + 1e-9


def test_blank_slide_gives_zero_blocks(tmp_path, caplog):
    slide = write_pyramid(tmp_path / "blank.tif", np.full((2000, 3000, 3), 255, np.uint8), 0.5)
    with caplog.at_level(logging.INFO):
        meta = make_mask(slide, tmp_path / "t.png", tmp_path / "qc" / "t.png", "blank")
        summary = roi_grid(
            slide, tmp_path / "t.png", tmp_path / "rois.h5", RoiGridParams(n=2, alpha=2),
            slide_id="blank",
        )  # fmt: skip
    assert meta["tissue_fraction"] == 0.0
    assert summary["n_blocks"] == 0
    grid = read_rois(tmp_path / "rois.h5", "blank")
    assert grid.level0_xy.shape == (0, 2) and grid.level0_xy.dtype == np.int64
    assert grid.tissue_fraction.shape == (0,)
    assert grid.grid_shape == (21, 32)  # ceil(2000/96), ceil(3000/96)
    assert "no tissue found" in caplog.text  # tissue_mask
    assert "no tissue in any block" in caplog.text  # roi_grid
    assert (tmp_path / "qc" / "t.png").is_file()


def test_read_tissue_mask_errors(tmp_path):
    with pytest.raises(SlideError, match=r"'s1'.*not found"):
        read_tissue_mask(tmp_path / "missing.png", slide_id="s1")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "plain.png")
    with pytest.raises(SlideError, match="lacks metadata"):
        read_tissue_mask(tmp_path / "plain.png", slide_id="s1")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(SlideError, match="not a readable PNG"):
        read_tissue_mask(tmp_path / "junk.png", slide_id="s1")


def test_mask_cli_writes_files_and_reports_errors(tmp_path, capsys):
    rc = main(
        [
            "tissue_mask",
            "--slide",
            str(CMU),
            "--slide-id",
            "cmu",
            "--out-mask",
            str(tmp_path / "t.png"),
            "--out-qc",
            str(tmp_path / "qc.png"),
            "--closing-diameter-um",
            "30",
        ]
    )
    assert rc == 0
    _, meta = read_tissue_mask(tmp_path / "t.png", "cmu")
    assert meta["closing_diameter_um"] == "30.0" and meta["method"] == "saturation"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    rc = main(
        [
            "tissue_mask",
            "--slide",
            str(tmp_path / "nope.svs"),
            "--slide-id",
            "nope",
            "--out-mask",
            str(tmp_path / "n.png"),
            "--out-qc",
            str(tmp_path / "nqc.png"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "'nope'" in err and "nope.svs" in err and "not found" in err
    assert not (tmp_path / "n.png").exists()


def test_open_slide_reads_written_pyramid(tmp_path):
    """The test pyramid writer produces what OpenSlide calls a 3-level slide with mpp."""
    slide = write_pyramid(tmp_path / "p.tif", np.full((600, 900, 3), 255, np.uint8), 0.25)
    with open_slide(slide) as s:
        assert s.level_count == 3 and s.mpp == pytest.approx(0.25)


def _band(x0: float, y0: float, x1: float, y1: float, width: float) -> np.ndarray:
    """A straight stroke of ``width`` from (x0, y0) to (x1, y1) as an (4, 2) x, y polygon."""
    d = np.array([x1 - x0, y1 - y0], float)
    n = np.array([-d[1], d[0]]) / np.hypot(*d) * width / 2
    p0, p1 = np.array([x0, y0], float), np.array([x1, y1], float)
    return np.stack([p0 + n, p1 + n, p1 - n, p0 - n])


def test_demo_generator_slide_with_pen_and_dust(tmp_path):
    """A slide of the demo generator (wsiscan.synth) with pen strokes in its ink colours (blue,
    green, faint and full black) and dust specks: the mask matches the planned tissue and holds
    no artefact."""
    from wsiscan.synth import Artefact, SlideRenderer, plan_slide, write_pyramid

    plan = plan_slide("pens", "normal", 7, 3000, 2400, 0.5, size_jitter=0)
    w, h = plan.width_px, plan.height_px
    inks = {  # optical densities (R, G, B) of the generator's pens
        "blue": np.array([1.05, 0.62, 0.18]) * 0.55,
        "green": np.array([0.95, 0.30, 0.80]) * 0.8,
        "black_faint": np.array([1.35, 1.30, 1.22]) * 0.55,
        "black": np.array([1.35, 1.30, 1.22]),
    }
    strokes = [
        _band(0.05 * w, 0.03 * h, 0.60 * w, 0.05 * h, 160),
        _band(0.30 * w, 0.97 * h, 0.95 * w, 0.95 * h, 120),
        _band(0.02 * w, 0.20 * h, 0.04 * w, 0.90 * h, 100),
        _band(0.97 * w, 0.10 * h, 0.98 * w, 0.70 * h, 200),
    ]
    plan.artefacts = [
        Artefact("pen", xy, od) for xy, od in zip(strokes, inks.values(), strict=True)
    ]
    rng = np.random.default_rng(0)
    far = np.argwhere(plan.sd_um < -150)  # dust on glass, >= 150 um from tissue
    for k in rng.choice(len(far), 12, replace=False):
        c = (far[k][::-1] + 0.5) * plan.cell_px
        t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        xy = c + rng.uniform(10, 80) * np.stack([np.cos(t), np.sin(t)], axis=1)
        od = rng.uniform(0.35, 1.1) * np.array([1.0, 1.05, 1.2])
        plan.artefacts.append(Artefact("dust", xy, od))
    write_pyramid(SlideRenderer(plan), tmp_path / "s.tif")
    meta = make_mask(tmp_path / "s.tif", tmp_path / "t.png", tmp_path / "q.png", "pens")
    mask, _ = read_tissue_mask(tmp_path / "t.png")
    # planned tissue (coarse signed distance > 0) sampled at the mask pixel centres
    ii, jj = np.indices(mask.shape)
    cy = ((ii + 0.5) * meta["downsample_y"] / plan.cell_px).astype(int)
    cx = ((jj + 0.5) * meta["downsample_x"] / plan.cell_px).astype(int)
    sd = plan.sd_um[
        np.minimum(cy, plan.sd_um.shape[0] - 1), np.minimum(cx, plan.sd_um.shape[1] - 1)
    ]
    truth = sd > 0
    filled = ndi.binary_fill_holes(truth)  # holes below hole_area_um2 are filled by design
    assert (mask & truth).sum() / truth.sum() > 0.95
    assert (mask & filled).sum() / mask.sum() > 0.95
    drawn = np.zeros(mask.shape, bool)
    for art in plan.artefacts:
        rr, cc = draw.polygon(
            art.level0_xy[:, 1] / meta["downsample_y"],
            art.level0_xy[:, 0] / meta["downsample_x"],
            mask.shape,
        )
        drawn[rr, cc] = True
    assert drawn.sum() > 1000
    # none of it is tissue, except where a stroke crosses tissue (closing_diameter_um = 50 um ~ 6 px)
    assert not (mask & drawn & ~ndi.binary_dilation(truth, iterations=6)).any()
    assert not mask[drawn & (sd < -150)].any()
