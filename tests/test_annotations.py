"""ASAP XML in/out (defused parsing), rasterisation conventions and QuPath GeoJSON export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from skimage.draw import polygon as skimage_polygon

from wsiscan.annotations import (
    EXCLUSION_GROUPS,
    TUMOUR_GROUPS,
    Annotation,
    AnnotationGroups,
    fill_polygon,
    rasterize,
    read_annotations,
    read_asap_xml,
    read_geojson,
    read_slide_annotations,
    split_groups,
    write_asap_xml,
    write_geojson,
)
from wsiscan.errors import ConfigError, SlideError
from wsiscan.params import SETTINGS


def _square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _xml(body: str, prolog: str = "") -> str:
    return f'<?xml version="1.0"?>\n{prolog}<ASAP_Annotations><Annotations>{body}</Annotations></ASAP_Annotations>\n'


def _anno(name: str, group: str, points: list[tuple], extra: str = "") -> str:
    coords = "".join(f'<Coordinate Order="{o}" X="{x}" Y="{y}" />' for o, x, y in points)
    return (
        f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58"{extra}>'
        f"<Coordinates>{coords}</Coordinates></Annotation>"
    )


# -- reading and writing -------------------------------------------------------------------------
def test_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    annotations = [
        Annotation("Annotation 0", "Tumor", rng.uniform(0, 1e5, (37, 2))),
        Annotation("Annotation 1", "_0", rng.uniform(0, 1e5, (5, 2))),
        Annotation(
            "Annotation 2", "_2", np.array([[0.1, 0.2], [1 / 3, 2e-9], [12345.678901234, 5.5]])
        ),
    ]
    path = tmp_path / "slide.xml"
    write_asap_xml(path, annotations)
    assert not (tmp_path / "slide.xml.tmp").exists()
    back = read_asap_xml(path, slide_id="s1")
    assert back == annotations
    text = path.read_text()
    assert 'Type="Polygon"' in text and "<AnnotationGroups>" in text
    assert text.count("<Group ") == 3  # one per group used


def test_empty_file_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "normal.xml"
    write_asap_xml(path, [])
    assert read_asap_xml(path, "normal_01") == []
    (tmp_path / "bare.xml").write_text("<ASAP_Annotations><Annotations/></ASAP_Annotations>")
    assert read_asap_xml(tmp_path / "bare.xml") == []


def test_points_sorted_by_order_and_decimal_comma(tmp_path: Path) -> None:
    body = _anno("a", "Tumor", [(2, 10, 20), (0, "1,5", 2), (1, 10, "2,25"), (3, 1, 20)])
    path = tmp_path / "a.xml"
    path.write_text(_xml(body))
    (ann,) = read_asap_xml(path)
    np.testing.assert_array_equal(ann.level0_xy, [[1.5, 2], [10, 2.25], [10, 20], [1, 20]])
    assert ann.name == "a" and ann.group == "Tumor"
    assert ann.level0_xy.dtype == np.float64


def test_short_polygons_skipped_with_warning(tmp_path: Path, caplog) -> None:
    body = _anno("dot", "Tumor", [(0, 5, 5)]) + _anno("line", "_1", [(0, 1, 1), (1, 9, 9)])
    body += _anno("ok", "_1", [(0, 0, 0), (1, 9, 0), (2, 9, 9)])
    path = tmp_path / "short.xml"
    path.write_text(_xml(body))
    with caplog.at_level(logging.WARNING, logger="wsiscan.annotations"):
        out = read_asap_xml(path, "s")
    assert [a.name for a in out] == ["ok"]
    assert "'dot'" in caplog.text and "'line'" in caplog.text


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<ASAP_Annotations><Annotations><Annotation Name="&lol4;" PartOfGroup="Tumor"/></Annotations>
</ASAP_Annotations>
"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE foo [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<ASAP_Annotations><Annotations><Annotation Name="&xxe;" PartOfGroup="Tumor"/></Annotations>
</ASAP_Annotations>
"""


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        (BILLION_LAUGHS, "unsafe XML refused"),
        (EXTERNAL_ENTITY, "unsafe XML refused"),
        ("<ASAP_Annotations><Annotations><Annotation", "malformed"),
        ("<Something/>", "not an ASAP annotation file"),
        (_xml('<Annotation Name="g"><Coordinates/></Annotation>'), "no PartOfGroup"),
        (_xml(_anno("m", "Tumor", [(0, 1, 1), (1, 2, 2)]).replace(' Y="2"', "")), "missing"),
        (_xml(_anno("n", "Tumor", [(0, 1, 1), (1, "x", 2), (2, 3, 3)])), "bad <Coordinate>"),
        (_xml(_anno("i", "Tumor", [(0, 1, 1), (1, "nan", 2), (2, 3, 3)])), "non-finite"),
        (_xml(_anno("o", "Tumor", [("first", 1, 1), (1, 2, 2), (2, 3, 3)])), "bad <Coordinate>"),
    ],
)
def test_bad_xml_gives_slide_error(tmp_path: Path, text: str, cause: str) -> None:
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(SlideError) as info:
        read_asap_xml(path, slide_id="tumor_042")
    message = str(info.value)
    assert "tumor_042" in message and str(path) in message and cause in message
    assert info.value.slide_id == "tumor_042"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="not found"):
        read_asap_xml(tmp_path / "nope.xml", "s")


# -- groups and rasters --------------------------------------------------------------------------
def test_split_groups(caplog) -> None:
    xy = _square(0, 0, 4, 4)
    annotations = [
        Annotation(str(i), g, xy) for i, g in enumerate(["Tumor", "_0", "_1", "_2", "x"])
    ]
    with caplog.at_level(logging.WARNING, logger="wsiscan.annotations"):
        tumour, excl = split_groups(annotations)
    assert [a.group for a in tumour] == list(TUMOUR_GROUPS)
    assert [a.group for a in excl] == list(EXCLUSION_GROUPS)
    assert "'x'" in caplog.text


def test_rasterize_pixel_centre_convention() -> None:
    square = [Annotation("t", "Tumor", _square(10, 10, 50, 30))]
    m1 = rasterize(square, (40, 60), downsample=1)
    assert m1.sum() == 40 * 20
    assert m1[10:30, 10:50].all()
    m2 = rasterize(square, (40, 60), downsample=2)  # centres (j + 0.5) * 2 inside [10, 50]
    assert m2.sum() == 20 * 10 and m2[5:15, 5:25].all()
    # x 9..51 -> 2.25..12.75 at downsample 4: centres j + 0.5 inside for j = 2..12; y: j = 2..7
    m4 = rasterize([Annotation("t", "Tumor", _square(9, 9, 51, 31))], (20, 20), downsample=4.0)
    assert m4[2:8, 2:13].all() and m4.sum() == 6 * 11


def test_rasterize_exclusions_and_clipping() -> None:
    annotations = [
        Annotation("t", "Tumor", _square(0, 0, 64, 64)),
        Annotation("hole", "_2", _square(16, 16, 32, 32)),
        Annotation("partly", "_1", _square(90, 90, 200, 200)),
        Annotation("outside", "_0", _square(500, 500, 600, 600)),
        Annotation("negative", "Tumor", _square(-100, -100, -10, -10)),
    ]
    mask = rasterize(annotations, (100, 100), downsample=1)
    assert mask.dtype == bool and mask.shape == (100, 100)
    assert not mask[16:32, 16:32].any()  # the _2 hole is cut out
    assert mask[0:16, 0:64].all() and mask[32:64, 0:64].all()
    assert mask[90:, 90:].all()  # clipped at the raster border
    assert mask.sum() == 64 * 64 - 16 * 16 + 10 * 10
    with pytest.raises(ValueError, match="downsample"):
        rasterize(annotations, (10, 10), downsample=0)


def test_rasterize_matches_skimage_on_irregular_polygons() -> None:
    rng = np.random.default_rng(3)
    theta = np.sort(rng.uniform(0, 2 * np.pi, 40))
    r = rng.uniform(300, 900, 40)
    xy = np.stack([2000 + r * np.cos(theta), 1500 + r * np.sin(theta)], axis=1)
    mask = rasterize([Annotation("a", "Tumor", xy)], (120, 160), downsample=16)
    rr, cc = skimage_polygon(xy[:, 1] / 16 - 0.5, xy[:, 0] / 16 - 0.5, (120, 160))
    ref = np.zeros((120, 160), bool)
    ref[rr, cc] = True
    assert (mask == ref).all() and 100 < mask.sum() < 120 * 160


def test_fill_polygon_matches_rasterize() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(3, 30))
        xy = rng.uniform(-50, 400, (n, 2))
        scale = float(rng.choice([1.0, 2.0, 4.0, 16.0, 3.3]))
        mask = np.zeros((40, 50), bool)
        fill_polygon(mask, xy, (0.0, 0.0), scale=scale)
        ref = rasterize([Annotation("a", "Tumor", xy)], (40, 50), downsample=scale)
        assert (mask == ref).all()
        # an offset origin shifts the raster; value=False clears
        fill_polygon(mask, xy + (8 * scale, 0), (8 * scale, 0.0), scale=scale, value=False)
        assert not mask.any()


# -- GeoJSON -------------------------------------------------------------------------------------
def test_geojson_feature_collection(tmp_path: Path) -> None:
    polys = [_square(0, 0, 10, 10), np.array([[5.5, 5], [20, 5], [12, 30], [5.5, 5]])]
    path = tmp_path / "out" / "lesions.geojson"
    write_geojson(path, polys, properties=[{"confidence": 0.9}, {"confidence": 0.4}])
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    for feat, poly, conf in zip(doc["features"], polys, [0.9, 0.4], strict=True):
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        ring = feat["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1]  # closed
        assert len(ring) == (len(poly) + 1 if not np.array_equal(poly[0], poly[-1]) else len(poly))
        props = feat["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] == "Tumor"
        assert len(props["classification"]["color"]) == 3
        assert props["confidence"] == conf
    write_geojson(tmp_path / "empty.geojson", [], classification="Normal")
    assert json.loads((tmp_path / "empty.geojson").read_text())["features"] == []


def test_geojson_rejects_bad_polygons(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="N >= 3"):
        write_geojson(tmp_path / "x.geojson", [np.zeros((2, 2))])
    with pytest.raises(ValueError, match="non-finite"):
        write_geojson(tmp_path / "x.geojson", [np.array([[0, 0], [1, np.nan], [2, 2]])])
    with pytest.raises(ValueError, match="property dicts"):
        write_geojson(tmp_path / "x.geojson", [_square(0, 0, 1, 1)], properties=[])


# -- GeoJSON in ----------------------------------------------------------------------------------
def _ring(xy) -> list:
    ring = [list(map(float, p)) for p in xy]
    return ring + [ring[0]]


def _feature(geometry: dict, name=None, cls="Tumor", classification=None) -> dict:
    props: dict = {"objectType": "annotation"}
    if name is not None:
        props["name"] = name
    if classification is not None:
        props["classification"] = classification
    elif cls is not None:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def test_geojson_polygons_multipolygons_holes_and_classes(tmp_path: Path, caplog) -> None:
    outer, hole = _square(0, 0, 64, 64), _square(16, 16, 32, 32)
    doc = {
        "type": "FeatureCollection",
        "features": [
            _feature({"type": "Polygon", "coordinates": [_ring(outer), _ring(hole)]}, "ring"),
            _feature(
                {
                    "type": "MultiPolygon",
                    "coordinates": [[_ring(_square(70, 0, 80, 10))], [_ring(_square(70, 20, 80, 30))]],
                },
                cls="Other",
            ),
            _feature({"type": "Polygon", "coordinates": [_ring(_square(0, 70, 10, 80))]},
                     classification={"names": ["Tumor", "Positive"]}),
            _feature({"type": "Polygon", "coordinates": [_ring(_square(40, 70, 50, 80))]}, cls=None),
            _feature({"type": "Point", "coordinates": [5.0, 5.0]}, "dot"),
            _feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}),
            {"type": "Feature", "geometry": None, "properties": {}},
            _feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0], [0, 0]]]}),
        ],
    }  # fmt: skip
    path = _write(tmp_path / "qupath.geojson", doc)
    with caplog.at_level(logging.WARNING, logger="wsiscan.annotations"):
        anns = read_geojson(path, "s")
    assert [a.group for a in anns] == ["Tumor", "Other", "Other", "Tumor: Positive", ""]
    assert anns[0].name == "ring" and anns[1].name == "Feature 1 part 0"
    np.testing.assert_array_equal(anns[0].level0_xy, outer)  # closing position dropped
    assert len(anns[0].holes) == 1 and np.array_equal(anns[0].holes[0], hole)
    assert "Point feature(s) are not areas" in caplog.text and "LineString" in caplog.text
    assert "no geometry" in caplog.text and "fewer than 3 distinct" in caplog.text
    # the hole belongs to its polygon only: another tumour polygon inside it stays
    inner = Annotation("inner", "Tumor", _square(20, 20, 28, 28))
    mask = rasterize([anns[0], inner], (64, 64), downsample=1)
    assert mask.sum() == 64 * 64 - 16 * 16 + 8 * 8 and mask[20:28, 20:28].all()
    assert not mask[16:20, 16:32].any()
    # group settings map classification names: Other as exclusion cuts out of the tumour
    groups = AnnotationGroups(tumour=("Tumor",), exclusion=("Other",))
    both = [anns[0], Annotation("cut", "Other", _square(48, 0, 64, 64))]
    assert rasterize(both, (64, 64), 1, groups).sum() == 48 * 64 - 16 * 16
    # a single Feature and a bare list of features (QuPath writes both) read the same
    single = _write(tmp_path / "one.json", doc["features"][0])
    listed = _write(tmp_path / "list.geojson", doc["features"][:1])
    assert read_annotations(single) == read_annotations(listed) == anns[:1]


def test_geojson_round_trip_of_the_writer(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    polys = [rng.uniform(0, 5e4, (n, 2)) for n in (3, 17, 40)]
    path = tmp_path / "lesions.geojson"
    write_geojson(path, polys, metadata={"slide_id": "s"})
    back = read_geojson(path)
    assert [a.group for a in back] == ["Tumor"] * 3
    for a, p in zip(back, polys, strict=True):
        np.testing.assert_array_equal(a.level0_xy, p)


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("{", "not JSON text"),
        ('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, NaN], [1, 1], '
         "[2, 0], [0, 0]]]}}", "NaN is not a number"),
        ('{"type": "Topology"}', "got type 'Topology'"),
        ('{"type": "FeatureCollection"}', "no list of features"),
        ('[{"type": "Polygon", "coordinates": []}]', "feature 0 is not a GeoJSON Feature"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, "a"], [1, 1], '
         '[2, 0]]]}}]', "is not [x, y] numbers"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 1e400], '
         "[1, 1], [2, 0]]]}}]", "non-finite"),
        ('[{"type": "Feature", "geometry": {"type": "Circle", "coordinates": []}}]',
         "unknown geometry type 'Circle'"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], '
         '[2, 0]]]}, "properties": {"classification": {"color": [1, 2, 3]}}}]', "has no name"),
        ("42", "got a JSON int"),
    ],
)  # fmt: skip
def test_bad_geojson_gives_slide_error(tmp_path: Path, text: str, cause: str) -> None:
    path = _write(tmp_path / "bad.geojson", text)
    with pytest.raises(SlideError) as info:
        read_geojson(path, slide_id="tumor_042")
    message = str(info.value)
    assert "tumor_042" in message and str(path) in message and cause in message, message


# -- what the stages read ------------------------------------------------------------------------
def test_group_settings_default_to_camelyon16() -> None:
    assert SETTINGS["annotation.tumour_groups"].default == TUMOUR_GROUPS == ("Tumor", "_0", "_1")
    assert SETTINGS["annotation.exclusion_groups"].default == EXCLUSION_GROUPS == ("_2",)
    with pytest.raises(ConfigError, match="both name"):
        AnnotationGroups(tumour=("Tumor", "_2"))
    with pytest.raises(ConfigError, match="at least one"):
        AnnotationGroups(tumour=())


def test_slide_annotations_refuse_silently_wrong_ground_truth(tmp_path: Path) -> None:
    wh = (3200, 2400)
    square = [(0, 100, 100), (1, 900, 100), (2, 900, 800), (3, 100, 800)]

    def read(body: str, name: str = "a.xml", **kw):
        path = tmp_path / name
        path.write_text(_xml(body))
        return read_slide_annotations(path, wh, slide_id="t1", tumour_slide=True, **kw)

    def fails(body: str, *words: str, **kw) -> None:
        with pytest.raises(SlideError) as info:
            read(body, **kw)
        message = str(info.value)
        for word in ("slide 't1'", "a.xml", *words):
            assert word in message, message

    fails("", "tumour slide without a tumour annotation", "holds no polygon")
    camelyon17 = _anno("A0", "metastases", square)
    fails(camelyon17, "groups found: ['metastases']", "annotation.tumour_groups")
    (ann,) = read(camelyon17, groups=AnnotationGroups(tumour=("metastases",)))
    assert ann.group == "metastases"
    for bad in ("1e300", "1e18", "-7000", "9601"):
        fails(_anno("A0", "Tumor", [*square[:2], (2, bad, 800), square[3]]), "far outside", "A0")
    edge = [(0, -3000, 100), (1, 6000, 100), (2, 6000, 4500), (3, -3000, -2000)]
    assert len(read(_anno("A0", "Tumor", edge))) == 1  # within one slide size: clipped
    outside = [(0, 3300, 100), (1, 3500, 100), (2, 3500, 300)]
    fails(_anno("A0", "Tumor", outside), "all lie outside the 3200x2400 px slide")
    seen: list[str] = []
    kept = read(_anno("A0", "Tumor", square) + _anno("A1", "Tumor", outside), warn=seen.append)
    assert [a.name for a in kept] == ["A0"] and "lie outside" in seen[0]
    # a normal slide may have none; a mask TIFF is not a polygon file
    path = tmp_path / "n.xml"
    path.write_text(_xml(""))
    assert read_slide_annotations(path, wh, slide_id="n1") == []
    with pytest.raises(SlideError, match="not a polygon annotation file"):
        read_annotations(tmp_path / "t_Mask.tif", "t1")
