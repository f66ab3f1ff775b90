"""Lesion points (NMS, components), slide score and region exports from a real probmap.h5."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from wsiscan import __version__
from wsiscan.detect import (
    cells_to_level0_xy,
    component_points,
    detect,
    mask_regions,
    nms_cells,
    nms_points,
    slide_score,
)
from wsiscan.errors import SlideError
from wsiscan.formats.lesions import format_confidence
from wsiscan.formats.probmap import FORMAT as PROBMAP_FORMAT
from wsiscan.params import DetectParams


def nms_reference(prob: np.ndarray, threshold: float, radius_cells: float) -> np.ndarray:
    """The plain loop: take the maximum, emit it, remove the disk around it, repeat."""
    work = prob.astype(np.float64).copy()
    h, w = work.shape
    ii, jj = np.mgrid[:h, :w]
    out = []
    while work.size and work.max() >= threshold:
        i, j = divmod(int(np.argmax(work)), w)
        out.append((float(prob[i, j]), i, j))
        work[(ii - i) ** 2 + (jj - j) ** 2 <= radius_cells**2] = -np.inf
    return np.asarray(out, dtype=np.float64).reshape(-1, 3)


def write_probmap(
    path: Path,
    prob: np.ndarray,
    *,
    stride_px: int = 16,
    mpp: float = 0.5,
    slide_wh: tuple[int, int] | None = None,
    threshold: float = 0.5,
    slide_id: str = "s1",
    mask: np.ndarray | None = None,
) -> Path:
    """A probmap.h5 as the stitch stage writes it."""
    h, w = prob.shape
    slide_wh = slide_wh or (w * stride_px, h * stride_px)
    with h5py.File(path, "w") as f:
        f.create_dataset("prob", data=prob.astype(np.float32))
        m = prob >= threshold if mask is None else mask
        f.create_dataset("mask", data=m.astype(np.uint8))
        f.attrs.update(
            {
                "format": PROBMAP_FORMAT,
                "stride_px": stride_px,
                "mpp": mpp,
                "slide_width": slide_wh[0],
                "slide_height": slide_wh[1],
                "slide_id": slide_id,
                "model_checksum": "abc123",
                "wsiscan_version": __version__,
                "threshold": threshold,
            }
        )
    return path


@pytest.mark.parametrize("seed", range(12))
def test_nms_equals_plain_loop_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 60, size=2)
    prob = rng.random((h, w)).astype(np.float32)
    if seed % 3 == 0:  # many ties
        prob = (np.round(prob * 8) / 8).astype(np.float32)
    if seed % 4 == 1:  # smooth blobs, the realistic case
        from scipy import ndimage

        prob = ndimage.gaussian_filter(rng.random((h, w)), 3).astype(np.float32)
        prob = (prob - prob.min()) / max(np.ptp(prob), 1e-9)
    threshold = float(rng.choice([0.0, 0.2, 0.5, 0.9]))
    radius = float(rng.choice([0.0, 0.7, 1.0, 2.5, 7.3]))
    got = nms_cells(prob, threshold=threshold, radius_cells=radius)
    want = nms_reference(prob, threshold, radius)
    np.testing.assert_array_equal(got, want)


def test_nms_points_radius_in_um_and_level0_coordinates():
    prob = np.zeros((40, 40), np.float32)
    prob[10, 10] = 0.9
    prob[10, 16] = 0.8  # 6 cells = 96 px = 48 um away at stride 16, mpp 0.5
    prob[30, 5] = 0.7
    pts = nms_points(prob, 16, 0.5, threshold=0.5, radius_um=50.0)
    np.testing.assert_array_equal(pts[:, 1:], [[168, 168], [88, 488]])
    np.testing.assert_allclose(pts[:, 0], [0.9, 0.7], rtol=1e-6)
    pts = nms_points(prob, 16, 0.5, threshold=0.5, radius_um=47.0)
    assert len(pts) == 3
    assert np.all(np.diff(pts[:, 0]) <= 0)
    # nothing at or above the threshold
    assert nms_points(prob, 16, 0.5, threshold=0.95, radius_um=50.0).shape == (0, 3)
    assert nms_points(np.zeros((0, 0)), 16, 0.5, threshold=0.5, radius_um=50.0).shape == (0, 3)


def test_cell_centres_and_clamping():
    xy = cells_to_level0_xy(np.array([0, 2]), np.array([0, 3]), 16)
    np.testing.assert_array_equal(xy, [[8, 8], [56, 40]])
    # a map cell whose centre lies past the slide border is clamped into it
    xy = cells_to_level0_xy(np.array([2]), np.array([3]), 16, slide_wh=(50, 35))
    np.testing.assert_array_equal(xy, [[49, 34]])
    xy = cells_to_level0_xy(np.array([1]), np.array([1]), 10.5)
    np.testing.assert_array_equal(xy, [[15, 15]])


def test_component_points_max_per_8_connected_component():
    prob = np.zeros((10, 12), np.float32)
    prob[1, 1], prob[2, 2] = 0.6, 0.8  # diagonal: one component under 8-connectivity
    prob[6:9, 6:10] = 0.55
    prob[7, 8] = 0.95
    prob[0, 11] = 0.7  # single cell
    pts = component_points(prob, 0.5, 16)
    np.testing.assert_allclose(pts[:, 0], [0.95, 0.8, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(pts[:, 1:], [[8 * 16 + 8, 7 * 16 + 8], [40, 40], [184, 8]])
    # with a given mask, and a minimum area: 1 cell = (16 * 0.5)^2 = 64 um2
    mask = prob >= 0.5
    pts = component_points(prob, mask, 16, mpp=0.5, min_area_um2=3 * 64.0)
    np.testing.assert_allclose(pts[:, 0], [0.95], rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        component_points(prob, mask[:-1], 16)


@pytest.mark.parametrize("seed", range(5))
def test_component_cells_equal_a_per_label_loop(seed):
    from skimage.measure import label

    from wsiscan.detect import component_cells

    rng = np.random.default_rng(seed)
    prob = (np.round(rng.random((50, 70)) * 6) / 6).astype(np.float32)  # many ties
    mask = prob >= 0.5
    labels = label(mask, connectivity=2)
    want = []
    for k in range(1, labels.max() + 1):
        masked = np.where(labels == k, prob, -np.inf)
        i, j = divmod(int(np.argmax(masked)), prob.shape[1])
        want.append((float(prob[i, j]), i, j, k, int((labels == k).sum())))
    want.sort(key=lambda r: (-r[0], r[1], r[2]))
    cells, ids, sizes = component_cells(prob, mask)
    np.testing.assert_array_equal(cells, np.array([w[:3] for w in want], dtype=np.float64))
    assert ids.tolist() == [w[3] for w in want] and sizes.tolist() == [w[4] for w in want]
    cells, ids, sizes = component_cells(prob, mask, min_cells=3)
    assert sizes.min() >= 3 and len(ids) == sum(w[4] >= 3 for w in want)


def test_slide_score():
    assert slide_score(np.array([[0.1, 0.7], [0.3, 0.2]], np.float32)) == pytest.approx(0.7)
    assert slide_score(np.zeros((0, 0))) == 0.0
    with pytest.raises(ValueError):
        slide_score(np.zeros((2, 2)), "mean")


def test_mask_regions_outline_on_cell_borders():
    prob = np.zeros((20, 20), np.float32)
    prob[4:8, 5:11] = 0.7  # 4 x 6 cells
    prob[5, 6] = 0.9
    prob[6, 8] = 0.0  # a hole: filled for the outline, not counted in the area
    prob[15, 15] = 0.6
    regions = mask_regions(prob, prob >= 0.5, 16, 0.25)
    assert len(regions) == 2
    big = regions[0]
    assert big.max_probability == pytest.approx(0.9)
    assert big.n_cells == 23
    assert big.area_um2 == pytest.approx(23 * (16 * 0.25) ** 2)
    poly = big.polygon_level0_xy
    assert np.array_equal(poly[0], poly[-1])
    # the outline runs along the component's cell borders: x in [5*16, 11*16], y in [4*16, 8*16]
    assert poly[:, 0].min() == pytest.approx(80) and poly[:, 0].max() == pytest.approx(176)
    assert poly[:, 1].min() == pytest.approx(64) and poly[:, 1].max() == pytest.approx(128)
    # a single cell gives a small closed diamond around its centre (248, 248)
    small = regions[1].polygon_level0_xy
    np.testing.assert_allclose(small.mean(axis=0), [248, 248], atol=2.0)
    assert len(mask_regions(prob, prob >= 0.5, 16, 0.25, min_area_um2=100.0)) == 1
    assert mask_regions(prob, np.zeros_like(prob, bool), 16, 0.25) == []


def test_format_confidence_round_trips_map_values():
    v = np.float32(0.7)
    assert format_confidence(v) == "0.7"
    assert np.float32(float(format_confidence(v))) == v
    assert float(format_confidence(0.123456789012)) == 0.123456789012
    vals = np.sort(np.random.default_rng(0).random(1000).astype(np.float32))
    back = np.array([float(format_confidence(x)) for x in vals])
    assert np.all(np.diff(back) >= 0) and np.array_equal(back.astype(np.float32), vals)


@pytest.mark.parametrize("method", ["nms", "components"])
def test_detect_slide_writes_all_outputs(tmp_path, method):
    from wsiscan.annotations import read_asap_xml

    rng = np.random.default_rng(1)
    prob = (rng.random((30, 40)) * 0.3).astype(np.float32)
    prob[5:12, 5:15] = 0.8
    prob[8, 9] = 0.97
    prob[20:23, 30:33] = 0.6
    pm = write_probmap(tmp_path / "probmap.h5", prob, stride_px=16, mpp=0.5, slide_wh=(635, 470))
    out = {k: tmp_path / f"lesions.{k}" for k in ("csv", "json", "geojson", "xml")}
    rec = detect(
        pm,
        out["csv"],
        out["json"],
        out["geojson"],
        out["xml"],
        DetectParams(method=method, threshold=0.5, nms_radius_um=100.0),
        slide_id="s1",
    )
    df = pd.read_csv(out["csv"])
    assert list(df.columns) == ["confidence", "x", "y"]
    assert df["x"].dtype.kind == "i" and df["y"].dtype.kind == "i"
    assert df["confidence"].is_monotonic_decreasing
    assert df["confidence"].iloc[0] == pytest.approx(0.97)
    assert (df.iloc[0]["x"], df.iloc[0]["y"]) == (9 * 16 + 8, 8 * 16 + 8)
    assert (df["x"] < 635).all() and (df["y"] < 470).all()
    if method == "components":
        assert len(df) == 2
    score = json.loads(out["json"].read_text())
    assert score == rec
    assert score["score"] == pytest.approx(0.97)
    assert score["n_lesions"] == len(df)
    assert score["model_checksum"] == "abc123"
    assert score["wsiscan_version"] == __version__
    assert score["method"] == method and score["nms_radius_um"] == 100.0
    gj = json.loads(out["geojson"].read_text())
    feats = gj["features"]
    regions = [f for f in feats if f["geometry"]["type"] == "Polygon"]
    points = [f for f in feats if f["geometry"]["type"] == "Point"]
    assert len(regions) == 2 and len(points) == len(df)
    measured = [f["properties"]["measurements"] for f in regions]
    assert measured[0]["Max probability"] == pytest.approx(0.97)
    assert all("Area µm^2" in m and "Longest diameter µm" in m for m in measured)
    assert [p["geometry"]["coordinates"] for p in points] == df[["x", "y"]].values.tolist()
    assert len(score["regions"]) == 2 and score["regions"][0]["category"] == "itc"
    anns = read_asap_xml(out["xml"])
    assert len(anns) == 2
    assert {a.group for a in anns} == {"_0"}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_detect_slide_empty_map_and_wrong_slide(tmp_path):
    pm = write_probmap(tmp_path / "probmap.h5", np.zeros((8, 8), np.float32))
    out = [tmp_path / n for n in ("l.csv", "s.json", "l.geojson", "l.xml")]
    rec = detect(pm, *out, DetectParams(), slide_id="s1")
    assert rec["n_lesions"] == 0 and rec["score"] == 0.0
    assert out[0].read_text() == "confidence,x,y\n"
    assert pd.read_csv(out[0]).empty
    with pytest.raises(SlideError, match="belongs to slide 's1'"):
        detect(pm, *out, DetectParams(), slide_id="other")
    with pytest.raises(SlideError, match="not found"):
        detect(tmp_path / "nope.h5", *out, DetectParams(), slide_id="s1")


def test_nms_on_a_large_lesion():
    """A 2000 x 2000 map with a large region above threshold (~1M candidate cells): NMS finishes
    and keeps the peak first. How fast is not a test's business (busy CI machines)."""
    yy, xx = np.mgrid[:2000, :2000]
    prob = np.exp(-((yy - 900.0) ** 2 + (xx - 1100.0) ** 2) / (2 * 400.0**2)).astype(np.float32)
    pts = nms_points(prob, 16, 0.243, threshold=0.5, radius_um=200.0)
    assert pts[0, 0] == pytest.approx(1.0)


def test_cli_detect(tmp_path, capsys):
    from wsiscan.cli import main

    prob = np.zeros((10, 10), np.float32)
    prob[4, 4] = 0.9
    pm = write_probmap(tmp_path / "probmap.h5", prob)
    args = ["detect", "--probmap", str(pm), "--out-lesions", str(tmp_path / "l.csv")]
    args += ["--out-score", str(tmp_path / "s.json"), "--out-geojson", str(tmp_path / "l.geojson")]
    args += ["--out-xml", str(tmp_path / "l.xml"), "--method", "components", "--threshold", "0.5"]
    args += ["--nms-radius-um", "100", "--min-area-um2", "0"]
    assert main([*args, "--slide-id", "s1"]) == 0
    assert pd.read_csv(tmp_path / "l.csv").values.tolist() == [[pytest.approx(0.9), 72, 72]]
    assert main([*args, "--slide-id", "s2"]) == 1
    assert "wsiscan detect: error: slide 's2'" in capsys.readouterr().err


def test_lesions_geojson_read_back_rasterises_to_the_lesion_mask(tmp_path):
    """detect's lesions.geojson, read as an annotation (QuPath GeoJSON) and rasterised at the
    map's stride, is the map's lesion mask, holes included: blobs, L shapes, diagonal neighbours,
    single cells, a ring, islands in holes, random masks."""
    from scipy import ndimage

    from wsiscan.annotations import rasterize, read_slide_annotations

    rng = np.random.default_rng(4)
    mask = ndimage.binary_opening(rng.random((60, 80)) < 0.55)
    mask[:, 38:42] = False
    mask[2:12, 40:60] = True  # a ring: its hole is a hole of the exported polygon
    mask[5:9, 45:55] = False
    mask[6:8, 48:50] = True  # an island in the hole
    mask[20, 40], mask[21, 41], mask[22, 40] = True, True, True  # diagonal neighbours
    mask[30:34, 40], mask[33, 40:44] = True, True  # an L
    mask[40, 50] = True  # one cell
    prob = np.where(mask, 0.9, 0.1).astype(np.float32)
    stride = 16
    wh = (80 * stride - 5, 60 * stride - 7)  # the last cells reach past the slide
    pm = write_probmap(tmp_path / "probmap.h5", prob, stride_px=stride, slide_wh=wh, mask=mask)
    out = [tmp_path / n for n in ("l.csv", "s.json", "lesions.geojson", "l.xml")]
    detect(pm, *out, DetectParams(method="components"), slide_id="s1")
    anns = read_slide_annotations(out[2], wh, slide_id="s1", tumour_slide=True)
    assert {a.group for a in anns} == {"Tumor"}
    back = rasterize(anns, mask.shape, stride)
    np.testing.assert_array_equal(back, mask)
