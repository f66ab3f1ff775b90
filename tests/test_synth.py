"""The synthetic demo cohort: OpenSlide-readable pyramids, determinism, painted vs annotated tumour."""

from __future__ import annotations

import csv
import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from scipy import ndimage
from skimage import measure

from wsiscan import cli
from wsiscan.annotations import Annotation, fill_polygon, rasterize, read_asap_xml
from wsiscan.errors import ConfigError
from wsiscan.params import SynthSlideParams
from wsiscan.slide import open_slide
from wsiscan.synth import (
    CHUNK_PX,
    STRIP_PX,
    SlideRenderer,
    _halve,
    plan_slide,
    pyramid_level_sizes,
    slide_seed,
    synth_slide,
    write_pyramid,
)

REPO = Path(__file__).resolve().parents[1]

# a small tumour slide (2 x 1.5 mm) whose plan holds a micro-metastasis with a _2 exclusion,
# a lesion on the tissue border and an ITC (checked below, so a generator change shows up here)
TUMOUR_ID, SEED, W, H, MPP = "unit_tumor_03", 5, 4001, 3001, 0.5


@pytest.fixture(scope="module")
def tumour_slide(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("synth")
    params = SynthSlideParams(seed=SEED, width_px=W, height_px=H, mpp=MPP, size_jitter=0.0)
    summary = synth_slide(out / "t.tif", out / "t.xml", params, slide_id=TUMOUR_ID, label="tumor")
    plan = plan_slide(TUMOUR_ID, "tumor", SEED, W, H, MPP, size_jitter=0.0)
    return {"tif": out / "t.tif", "xml": out / "t.xml", "summary": summary, "plan": plan}


def _dark_fraction(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of masked pixels as dark as lymphocyte nuclei (green channel < 50)."""
    return float((rgb[..., 1][mask] < 50).mean())


def _mid_fraction(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of masked pixels in the mid tones of pale vesicular nuclei (green 60..129)."""
    g = rgb[..., 1][mask]
    return float(((g >= 60) & (g < 130)).mean())


# -- the file ------------------------------------------------------------------------------------
def test_pyramid_opens_in_openslide(tumour_slide) -> None:
    sizes = pyramid_level_sizes(W, H)
    assert sizes == [(4001, 3001), (2001, 1501), (1001, 751), (501, 376)]
    with open_slide(tumour_slide["tif"], TUMOUR_ID) as slide:
        assert slide.dimensions == (W, H)
        assert slide.level_count == len(sizes)
        assert list(slide.level_dimensions) == sizes
        expected = [((W / w) + (H / h)) / 2 for w, h in sizes]  # OpenSlide's definition
        np.testing.assert_allclose(slide.level_downsamples, expected, rtol=1e-9)
        assert any(ds != round(ds) for ds in slide.level_downsamples)  # odd sides
        assert slide.mpp == pytest.approx(MPP, rel=1e-9)
        assert slide.level_mpp(3) == pytest.approx(MPP * expected[3])
        assert float(slide._osr.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    with tifffile.TiffFile(tumour_slide["tif"]) as tif:
        assert len(tif.pages) == len(sizes)
        for i, page in enumerate(tif.pages):
            assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.subfiletype == (0 if i == 0 else 1)
            assert page.shape == (sizes[i][1], sizes[i][0], 3)


def test_pixels_match_the_renderer(tumour_slide) -> None:
    plan = tumour_slide["plan"]
    renderer = SlideRenderer(plan)
    les = max(plan.lesions, key=lambda les: les.area_um2)
    cx, cy = les.level0_xy.mean(axis=0).astype(int)
    x0, y0 = (int(cx) - 400) // 2 * 2, (int(cy) - 300) // 2 * 2  # even: level 1 aligns
    truth = renderer.render((x0, y0), (800, 600))
    with open_slide(tumour_slide["tif"]) as slide:
        got = slide.read_rgb((x0, y0), 0, (800, 600))
        err = np.abs(got.astype(int) - truth).mean()
        assert err < 6.0, err  # JPEG q88, YCbCr 4:2:0 on sharp nuclear borders
        assert (slide.read_rgb((W - 5, H - 5), 0, (20, 20))[10:, 10:] == 255).all()  # outside
    level1 = tifffile.imread(tumour_slide["tif"], key=1)  # reduced page: the 2x2 mean of level 0
    half = level1[y0 // 2 : y0 // 2 + 300, x0 // 2 : x0 // 2 + 400]
    assert np.abs(half.astype(int) - _halve(truth, 400)).mean() < 6.0


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    params = SynthSlideParams(seed=11, width_px=1900, height_px=1800, mpp=0.5)
    args = {"slide_id": "unit_normal_01", "label": "normal"}
    runs = []
    for name in ("a", "b"):
        s = synth_slide(tmp_path / f"{name}.tif", tmp_path / f"{name}.xml", params, **args)
        runs.append((digest(tmp_path / f"{name}.tif"), digest(tmp_path / f"{name}.xml"), s))
    assert runs[0][:2] == runs[1][:2]
    assert read_asap_xml(tmp_path / "a.xml") == []  # normal slides still get an XML
    # width/height vary around the request (+-20%) and are odd; another ID or seed differs
    s = runs[0][2]
    assert s["width_px"] % 2 == 1 and s["height_px"] % 2 == 1
    assert 0.8 * 1900 <= s["width_px"] <= 1.2 * 1900 + 1
    assert slide_seed(11, "unit_normal_01") != slide_seed(12, "unit_normal_01")
    synth_slide(
        tmp_path / "c.tif", tmp_path / "c.xml", params, slide_id="unit_normal_02", label="normal"
    )
    assert digest(tmp_path / "c.tif") != runs[0][0]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert not list(tmp_path.glob(".synth-spool-*"))


# -- painted tumour == annotations ---------------------------------------------------------------
def test_plan_holds_the_expected_lesions(tumour_slide) -> None:
    s = tumour_slide["summary"]
    kinds = [les["kind"] for les in s["lesions"]]
    assert "micro" in kinds and "itc" in kinds
    assert any(les["touches_border"] for les in s["lesions"])
    assert s["exclusions"] == 1
    assert s["tissue_pieces"] >= 2
    annotations = read_asap_xml(tumour_slide["xml"], TUMOUR_ID)
    assert [a.group for a in annotations].count("_2") == 1
    plan_annos = tumour_slide["plan"].annotations()
    assert len(annotations) == len(plan_annos)
    for a, b in zip(annotations, plan_annos, strict=True):
        np.testing.assert_array_equal(a.level0_xy, b.level0_xy)


def test_annotation_covers_exactly_the_painted_tumour(tumour_slide) -> None:
    plan = tumour_slide["plan"]
    renderer = SlideRenderer(plan)
    annotations = read_asap_xml(tumour_slide["xml"], TUMOUR_ID)
    for les in plan.lesions:
        (x0, y0), (x1, y1) = les.level0_xy.min(0) - 40, les.level0_xy.max(0) + 40
        x0, y0, w, h = int(x0), int(y0), int(x1 - x0), int(y1 - y0)
        shifted = [Annotation(a.name, a.group, a.level0_xy - (x0, y0)) for a in annotations]
        annotated = rasterize(shifted, (h, w), downsample=1)
        m = renderer.masks((x0, y0), (w, h))
        assert m["tumour"].any()
        assert not (m["tumour"] & ~annotated).any()  # nothing painted outside the annotation
        assert ((annotated & m["tissue"]) == m["tumour"]).all()  # annotated tissue is all tumour


def test_tumour_texture_differs_but_mean_colour_is_close(tumour_slide) -> None:
    plan = tumour_slide["plan"]
    renderer = SlideRenderer(plan)
    les = max(plan.lesions, key=lambda les: les.area_um2)
    (x0, y0), (x1, y1) = les.level0_xy.min(0) - 300, les.level0_xy.max(0) + 300
    x0, y0 = max(int(x0), 0), max(int(y0), 0)
    w, h = min(int(x1), W) - x0, min(int(y1), H) - y0
    with open_slide(tumour_slide["tif"]) as slide:
        rgb = slide.read_rgb((x0, y0), 0, (w, h))
    m = renderer.masks((x0, y0), (w, h))
    tumour = ndimage.binary_erosion(m["tumour"], iterations=20)
    normal = ndimage.binary_erosion(m["tissue"] & ~m["tumour"] & ~m["mimic"], iterations=20)
    assert tumour.sum() > 5000 and normal.sum() > 5000
    dark_t, dark_n = _dark_fraction(rgb, tumour), _dark_fraction(rgb, normal)
    assert dark_n > 2 * dark_t, (dark_n, dark_t)  # dense small dark nuclei ...
    mid_t, mid_n = _mid_fraction(rgb, tumour), _mid_fraction(rgb, normal)
    assert mid_t > 2 * mid_n, (mid_t, mid_n)  # ... vs large pale vesicular ones
    mean_t, mean_n = rgb[tumour].mean(0), rgb[normal].mean(0)
    assert np.abs(mean_t - mean_n).max() < 20, (mean_t, mean_n)  # not a flat colour shift
    # background glass is bright and almost flat
    glass = ndimage.binary_erosion(~m["tissue"], iterations=60)
    if glass.sum() > 1000:
        assert rgb[glass].mean() > 225 and rgb[glass].std() < 12


def test_exclusion_is_normal_tissue_inside_the_tumour(tumour_slide) -> None:
    plan = tumour_slide["plan"]
    (excl,) = plan.exclusions
    (x0, y0), (x1, y1) = excl.min(0) - 60, excl.max(0) + 60
    x0, y0, w, h = int(x0), int(y0), int(x1 - x0), int(y1 - y0)
    hole = np.zeros((h, w), bool)
    fill_polygon(hole, excl, (x0, y0))
    m = SlideRenderer(plan).masks((x0, y0), (w, h))
    assert m["tissue"][hole].all() and not m["tumour"][hole].any()
    ring = ndimage.binary_dilation(hole, iterations=50) & ~ndimage.binary_dilation(
        hole, iterations=8
    )
    assert m["tumour"][ring].mean() > 0.95  # the hole lies inside tumour
    with open_slide(tumour_slide["tif"]) as slide:
        rgb = slide.read_rgb((x0, y0), 0, (w, h))
    inner = ndimage.binary_erosion(hole, iterations=8)
    assert _dark_fraction(rgb, inner) > 2 * _dark_fraction(rgb, ring)


def test_regions_tile_seamlessly(tumour_slide) -> None:
    plan = tumour_slide["plan"]
    renderer = SlideRenderer(plan)
    les = next(les for les in plan.lesions if les.touches_border)
    x0, y0 = (les.level0_xy.mean(0) - 300).astype(int)
    whole = renderer.render((x0, y0), (600, 500))
    parts = np.empty_like(whole)
    for ys, ye in ((0, 137), (137, 500)):
        for xs, xe in ((0, 301), (301, 600)):
            parts[ys:ye, xs:xe] = renderer.render((x0 + xs, y0 + ys), (xe - xs, ye - ys))
    assert (parts == whole).all()


# -- the demo cohort -----------------------------------------------------------------------------
def _evaluation_regions(annotations, shape_hw, mpp: float) -> list[float]:
    """Major axes (um) of lesions as the Camelyon16 evaluation sees them (level 5, 75 um growth)."""
    mask = rasterize(annotations, shape_hw, downsample=32)
    grown = ndimage.distance_transform_edt(~mask) < 75 / (mpp * 32 * 2)
    labels = measure.label(ndimage.binary_fill_holes(grown), connectivity=2)
    return [r.axis_major_length * mpp * 32 for r in measure.regionprops(labels)]


def test_demo_cohort_plan_covers_every_case() -> None:
    """Plans (no pixels) of the sheet's demo slides at the configured size hold every case."""
    demo = SynthSlideParams.from_config(
        yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    )
    with open(REPO / "config" / "slides.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["split"] for r in rows].count("train") == 10
    assert sum(r["label"] == "tumor" and r["split"] == "test" for r in rows) == 6
    # centres: training from A and B; testing from A, B and the held-out C, each with both labels
    assert {r["centre"] for r in rows if r["split"] == "train"} == {"A", "B"}
    for centre in ("A", "B", "C"):
        assert {r["label"] for r in rows if r["split"] == "test" and r["centre"] == centre} == {
            "tumor",
            "normal",
        }
    seen: dict[str, int] = {}
    for row in rows:
        sid, label = row["slide_id"], row["label"]
        assert row["path"] == f"data/demo/{sid}.tif"
        assert row["annotation"] == (f"data/demo/{sid}.xml" if label == "tumor" else "")
        plan = plan_slide(
            sid, label, demo.seed, demo.width_px, demo.height_px, demo.mpp, demo.size_jitter
        )
        levels = len(plan.level_sizes())
        assert plan.width_px % 2**levels and plan.height_px % 2**levels
        assert 0.3 <= plan.tissue_fraction <= 0.6, (sid, plan.tissue_fraction)
        assert plan.tissue_pieces >= 1
        for key, n in (
            ("pieces>=2", plan.tissue_pieces >= 2),
            ("mimic_" + label, len(plan.mimics)),
            ("pen", sum(a.kind == "pen" for a in plan.artefacts)),
            ("dust", sum(a.kind == "dust" for a in plan.artefacts)),
            ("exclusion", len(plan.exclusions)),
            ("border", sum(les.touches_border for les in plan.lesions)),
        ):
            seen[key] = seen.get(key, 0) + int(n)
        if label == "normal":
            assert plan.lesions == []
            continue
        kinds = [les.kind for les in plan.lesions]
        assert {"micro", "macro"} & set(kinds), sid
        for kind in kinds:
            seen[kind] = seen.get(kind, 0) + 1
        for les in plan.lesions:
            lo, hi = {"itc": (40, 200), "micro": (300, 800), "macro": (800, 1600)}[les.kind]
            assert lo <= les.major_axis_um <= hi, (sid, les.kind, les.major_axis_um)
        # the Camelyon16 evaluation sees each ITC as an ITC and nothing else as one
        shape = (-(-plan.height_px // 32), -(-plan.width_px // 32))
        for les in plan.lesions:
            (axis,) = _evaluation_regions(
                [Annotation("l", les.group, les.level0_xy)], shape, plan.mpp
            )
            assert (axis < 275) == (les.kind == "itc"), (sid, les.kind, axis)
        assert len(_evaluation_regions(plan.annotations(), shape, plan.mpp)) == len(plan.lesions)
    for key in ("macro", "micro", "itc", "border", "exclusion", "mimic_tumor", "mimic_normal"):
        assert seen.get(key, 0) >= 1, (key, seen)
    assert seen["pen"] >= 1 and seen["dust"] >= 1 and seen["pieces>=2"] >= 15, seen


# -- limits and the command line -----------------------------------------------------------------
def test_memory_is_bounded_by_width_not_area(tmp_path: Path) -> None:
    """Peak allocations while streaming do not grow with the slide height (6x the area here)."""

    def peak(height: int) -> int:
        plan = plan_slide("unit_mem", "normal", 3, 2001, height, 0.5, size_jitter=0.0)
        renderer = SlideRenderer(plan)
        renderer.render((0, 0), (CHUNK_PX, STRIP_PX))  # warm the texture caches (fixed size)
        tracemalloc.start()
        write_pyramid(renderer, tmp_path / f"m{height}.tif")
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    short, tall = peak(1601), peak(9601)  # level 0 of the tall one alone is 58 MB
    assert tall < 1.25 * short + 2e6, (short, tall)


def test_pyramid_level_sizes() -> None:
    assert pyramid_level_sizes(100_000, 80_000)[-1] == (782, 625)
    assert len(pyramid_level_sizes(100_000, 80_000)) == 8
    assert pyramid_level_sizes(999, 500) == [(999, 500)]
    assert pyramid_level_sizes(1000, 10) == [(1000, 10), (500, 5)]


def test_cli_synth(tmp_path: Path, capsys) -> None:
    args = ["synth_slide", "--slide-id", "cli_normal_01", "--label", "normal", "--seed", "1"]
    out = ["--out-slide", str(tmp_path / "s.tif"), "--out-xml", str(tmp_path / "s.xml")]
    size = ["--width-px", "1701", "--height-px", "1801", "--mpp", "0.5", "--size-jitter", "0"]
    assert cli.main(args + out + size) == 0
    with open_slide(tmp_path / "s.tif") as slide:
        assert slide.dimensions == (1701, 1801)
    small = ["--width-px", "1000", "--height-px", "1000", "--mpp", "0.5"]
    assert cli.main(args + out + small) == 1
    assert "smaller than 800 um" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="label"):
        plan_slide("x", "unknown", 1, 4000, 4000, 0.5)
    with pytest.raises(ConfigError, match="slide ID"):
        plan_slide("bad id/..", "normal", 1, 4000, 4000, 0.5)
