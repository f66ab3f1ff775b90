"""What slide viewers open: the map as a pyramidal TIFF (real OpenSlide reads its mpp and values),
the detections as QuPath GeoJSON (valid GeoJSON by geojson-pydantic, QuPath's fields, the stated
area equal to the polygon's, holes kept), the QC picture and the FROC plot's curve."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pytest
from geojson_pydantic import FeatureCollection

from wsiscan.detect import AREA_MEASUREMENT, DIAMETER_MEASUREMENT, detect
from wsiscan.evaluate import froc_plot_curve
from wsiscan.formats.overlay import read_overlay_tiff, write_overlay_tiff
from wsiscan.formats.qupath import polygon_area, read_feature_collection
from wsiscan.params import DetectParams
from wsiscan.qc import scale_bar_mm

from .test_detect import write_probmap

STRIDE, MPP = 16, 0.5


def _map() -> np.ndarray:
    """A 300 x 600 cell map: a ring lesion (with a hole and an island in it), a small focus and a
    gradient, so that the pyramid has levels and every value 0..255 occurs."""
    prob = np.zeros((300, 600), np.float32)
    prob[20:80, 20:120] = 0.95
    prob[35:65, 45:95] = 0.1  # the hole
    prob[45:55, 65:75] = 0.8  # an island in the hole
    prob[150, 300] = 0.7  # a one-cell focus
    prob[200:, :256] = np.linspace(0, 1, 256, dtype=np.float32)[None, :]
    return prob


def test_overlay_tiff_opens_in_openslide_with_its_mpp_and_values(tmp_path):
    prob = _map()
    slide_wh = (600 * STRIDE + 7, 300 * STRIDE + 15)  # partial last cells are cut
    path = tmp_path / "probmap.tif"
    desc = write_overlay_tiff(
        path, prob, stride_px=STRIDE, mpp=MPP, slide_wh=slide_wh, slide_id="s1"
    )
    assert desc["overlay_mpp"] == MPP * STRIDE
    with openslide.OpenSlide(str(path)) as osr:
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP * STRIDE)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(MPP * STRIDE)
        assert osr.dimensions == (600, 300)  # slide size / stride exactly
        assert osr.level_count >= 2 and osr.level_downsamples[1] == pytest.approx(2.0)
        rgba = np.asarray(osr.read_region((0, 0), 0, osr.dimensions))
        # a focus stays visible zoomed out: reduced levels keep the 2 x 2 maximum
        low = np.asarray(osr.read_region((0, 0), 1, osr.level_dimensions[1]))
    expected = np.rint(prob * 255).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(rgba[..., c], expected)
    assert low[75, 150, 0] == round(0.7 * 255)
    level0, back = read_overlay_tiff(path, "s1")
    np.testing.assert_array_equal(level0, expected)
    assert back == desc


def _detect(tmp_path, prob: np.ndarray):
    pm = write_probmap(tmp_path / "probmap.h5", prob, stride_px=STRIDE, mpp=MPP)
    out = {n: tmp_path / n for n in ("lesions.csv", "score.json", "lesions.geojson", "lesions.xml")}
    params = DetectParams(method="nms", threshold=0.5, nms_radius_um=100.0)
    detect(pm, *out.values(), params, slide_id="s1", out_outlines=tmp_path / "outlines.geojson")
    return out


def test_geojson_is_valid_and_carries_qupath_fields(tmp_path):
    out = _detect(tmp_path, _map())
    text = out["lesions.geojson"].read_text()
    compact = json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    assert text == compact + "\n"
    for path in (out["lesions.geojson"], tmp_path / "outlines.geojson"):
        doc = json.loads(path.read_text())
        FeatureCollection.model_validate(doc)  # the GeoJSON spec (RFC 7946 structure)
        read_feature_collection(path, "s1")
    doc = json.loads(text)
    polygons = [f for f in doc["features"] if f["geometry"]["type"] == "Polygon"]
    points = [f for f in doc["features"] if f["geometry"]["type"] == "Point"]
    n_candidates = len(out["lesions.csv"].read_text().splitlines()) - 1
    assert len(points) == n_candidates > 0
    for f in doc["features"]:
        props = f["properties"]
        assert props["objectType"] == "annotation" and props["name"]
        assert props["classification"]["name"] and len(props["classification"]["color"]) == 3
        assert all(isinstance(v, float) for v in props["measurements"].values())
    ring = next(f for f in polygons if len(f["geometry"]["coordinates"]) > 1)
    rings = [np.array(r) for r in ring["geometry"]["coordinates"]]
    assert len(rings) == 2  # the hole kept (the island is a feature of its own)
    area_um2 = polygon_area(rings) * MPP**2
    assert ring["properties"]["measurements"][AREA_MEASUREMENT] == pytest.approx(area_um2, 1e-6)
    assert area_um2 < (100 * 60 - 50 * 30 + 60) * (STRIDE * MPP) ** 2  # less than filled
    assert ring["properties"]["measurements"][DIAMETER_MEASUREMENT] == pytest.approx(
        np.hypot(100, 60) * STRIDE * MPP, rel=0.02
    )
    assert "micro" in ring["properties"]["name"].lower()
    outlines = json.loads((tmp_path / "outlines.geojson").read_text())
    classes = {f["properties"]["classification"]["name"] for f in outlines["features"]}
    assert classes == {"Probability >= 0.5", "Probability >= 0.9"}


def test_qc_picture_and_scale_bar(tmp_path):
    assert [scale_bar_mm(w) for w in (1.0, 4.0, 10.0, 30.0)] == [0.2, 0.5, 2.0, 5.0]
    prob = _map()
    pm = write_probmap(tmp_path / "probmap.h5", prob, stride_px=STRIDE, mpp=MPP)
    out = [tmp_path / n for n in ("lesions.csv", "score.json", "lesions.geojson", "lesions.xml")]
    png = tmp_path / "qc.png"
    detect(pm, *out, DetectParams(), slide_id="s1", out_qc=png)
    from matplotlib.image import imread

    img = imread(png)
    assert img.ndim == 3 and min(img.shape[:2]) > 300
    # below the threshold the map is transparent: a map of 0.3 draws what a map of 0 draws
    # (below the title, which gives the score)
    pictures = []
    for p in (0.0, 0.3):
        pm = write_probmap(tmp_path / f"p{p}.h5", np.full((60, 120), p, np.float32), mpp=MPP)
        detect(pm, *out, DetectParams(), slide_id="s1", out_qc=tmp_path / f"qc{p}.png")
        pictures.append(imread(tmp_path / f"qc{p}.png"))
    top = pictures[0].shape[0] // 5
    np.testing.assert_array_equal(pictures[0][top:], pictures[1][top:])
    blank, lesions = pictures[0][top:, : img.shape[1] * 4 // 5], img[top:, : img.shape[1] * 4 // 5]
    assert np.ptp(blank[..., :3], axis=2).max() == 0  # grey only, left of the colour bar
    assert np.ptp(lesions[..., :3], axis=2).max() > 0.3  # the lesions in colour


def test_froc_plot_shows_a_curve_on_the_top_border():
    # a perfect curve: every lesion found before the first false positive
    x, y = froc_plot_curve(np.array([0.0, 0.0, 0.0]), np.array([0.0, 0.5, 1.0]), 8.5)
    assert x[-1] == 8.5 and y[-1] == 1.0 and np.all(np.diff(x) >= 0)
    assert np.count_nonzero(y == 1.0) >= 2  # a visible segment along the top border
