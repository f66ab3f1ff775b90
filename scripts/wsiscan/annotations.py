"""Lesion annotations: ASAP XML and QuPath GeoJSON in and out, polygons to rasters.

Coordinates are level-0 pixels (``level0_xy``: an ``(N, 2)`` float64 array of ``x, y``), as in the
Camelyon16 ASAP XML files and in QuPath's GeoJSON export. Each polygon belongs to a group (ASAP
``PartOfGroup``, GeoJSON ``properties.classification.name``); :class:`AnnotationGroups` (config
``annotation.tumour_groups`` and ``annotation.exclusion_groups``) says which groups are tumour and
which mark non-tumour regions cut out of the tumour. Defaults follow Camelyon16: ``Tumor``, ``_0``
and ``_1`` are tumour, ``_2`` exclusion (Camelyon17's XML files name their tumour group
``metastases``; QuPath's usual class is ``Tumor``). A polygon may have holes (GeoJSON interior
rings), which belong to it alone.

Raster convention (shared with the scan grid): pixel ``(i, j)`` of a raster at ``downsample`` covers
level-0 ``[j*downsample, (j+1)*downsample) x [i*downsample, (i+1)*downsample)`` and is set when its
centre lies inside the polygon (even-odd rule) and outside its holes.

:func:`read_slide_annotations` is what the stages use (evaluate, train_patches, mine_negatives):
it reads either format, refuses coordinates that cannot be pixels of the slide, leaves out
polygons entirely outside it (with a warning) and refuses a tumour slide without a tumour polygon.
"""

from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET  # noqa: S405  (building and writing only; parsing uses defusedxml)
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import defusedxml.ElementTree
import numpy as np
from skimage.draw import polygon as draw_polygon

from .errors import ConfigError, SlideError
from .fileio import write_bytes
from .params import SETTINGS

log = logging.getLogger(__name__)

TUMOUR_GROUPS: tuple[str, ...] = tuple(SETTINGS["annotation.tumour_groups"].default)
EXCLUSION_GROUPS: tuple[str, ...] = tuple(SETTINGS["annotation.exclusion_groups"].default)
#: File name endings of the polygon formats :func:`read_annotations` reads.
ASAP_SUFFIXES = (".xml",)
GEOJSON_SUFFIXES = (".geojson", ".json")
#: A vertex farther outside the slide than the slide's own width (height) is not one of its pixels.
OUTSIDE_MARGIN = 1.0

#: Annotation colours as ASAP and the Camelyon16 files write them.
_ANNOTATION_COLOUR = {"_2": "#64FE2E"}
_DEFAULT_ANNOTATION_COLOUR = "#F4FA58"
_GROUP_COLOUR = {"Tumor": "#FF0000", "_0": "#FF0000", "_1": "#FF0000", "_2": "#00FF00"}

#: GeoJSON classification colours (RGB) that QuPath shows.
_CLASS_RGB = {"Tumor": [200, 0, 0], "Exclusion": [0, 160, 0], "Normal": [0, 120, 200]}


@dataclass(frozen=True)
class AnnotationGroups:
    """Which annotation groups are tumour and which are exclusions (cut out of the tumour)."""

    tumour: tuple[str, ...] = TUMOUR_GROUPS
    exclusion: tuple[str, ...] = EXCLUSION_GROUPS

    def __post_init__(self) -> None:
        object.__setattr__(self, "tumour", tuple(self.tumour))
        object.__setattr__(self, "exclusion", tuple(self.exclusion))
        if not self.tumour:
            raise ConfigError("annotation.tumour_groups: must name at least one group")
        both = sorted(set(self.tumour) & set(self.exclusion))
        if both:
            raise ConfigError(
                f"annotation.tumour_groups and annotation.exclusion_groups both name {both}"
            )

    @classmethod
    def of(cls, params: Any) -> AnnotationGroups:
        """The groups of a stage record (its ``tumour_groups`` and ``exclusion_groups`` fields)."""
        return cls(tuple(params.tumour_groups), tuple(params.exclusion_groups))


DEFAULT_GROUPS = AnnotationGroups()


@dataclass
class Annotation:
    """One polygon annotation: its name, group, vertices in level-0 pixels and any holes."""

    name: str
    group: str
    level0_xy: np.ndarray  # (N, 2) float64, x, y level-0 px
    holes: tuple[np.ndarray, ...] = field(default=())  # (M, 2) level-0 rings cut out of it

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Annotation):
            return NotImplemented
        return (
            self.name == other.name
            and self.group == other.group
            and _same_ring(self.level0_xy, other.level0_xy)
            and len(self.holes) == len(other.holes)
            and all(_same_ring(a, b) for a, b in zip(self.holes, other.holes, strict=True))
        )


def _same_ring(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


# -- ASAP XML ------------------------------------------------------------------------------------
def _parse_float(text: str) -> float:
    """A coordinate as ASAP writes it; some locales wrote a decimal comma (``1234,5``)."""
    try:
        value = float(text)
    except ValueError:
        value = float(text.replace(",", "."))
    if not math.isfinite(value):
        raise ValueError(f"non-finite coordinate {text!r}")
    return value


def read_asap_xml(path: str | Path, slide_id: str | None = None) -> list[Annotation]:
    """Read the polygons of an ASAP (Camelyon16) XML file, vertices sorted by ``Order``.

    Parsing uses defusedxml: entity declarations (billion laughs), external entities and
    malformed XML raise :class:`SlideError` naming the slide, the file and the cause, as do
    missing ``PartOfGroup``/``Order``/``X``/``Y`` attributes. Polygons with fewer than three
    vertices are skipped with a warning. A file without annotations gives ``[]``.
    """
    path = Path(path)
    try:
        root = defusedxml.ElementTree.parse(path).getroot()
    except FileNotFoundError:
        raise SlideError(slide_id, path, "annotation file not found")
    except defusedxml.DefusedXmlException as exc:
        raise SlideError(slide_id, path, f"unsafe XML refused ({type(exc).__name__}: {exc})")
    except ET.ParseError as exc:
        raise SlideError(slide_id, path, f"malformed annotation XML: {exc}")
    except OSError as exc:
        raise SlideError(slide_id, path, f"cannot read annotation file: {exc}")
    if root.tag != "ASAP_Annotations":
        raise SlideError(slide_id, path, f"not an ASAP annotation file (root element <{root.tag}>)")

    annotations: list[Annotation] = []
    for index, elem in enumerate(root.iterfind("./Annotations/Annotation")):
        name = elem.get("Name") or f"Annotation {index}"
        group = elem.get("PartOfGroup")
        if group is None:
            raise SlideError(slide_id, path, f"annotation {name!r} has no PartOfGroup attribute")
        rows: list[tuple[int, float, float]] = []
        for coord in elem.iterfind("./Coordinates/Coordinate"):
            try:
                order, x, y = coord.get("Order"), coord.get("X"), coord.get("Y")
                if order is None or x is None or y is None:
                    missing = [k for k, v in (("Order", order), ("X", x), ("Y", y)) if v is None]
                    raise ValueError(f"missing attribute {', '.join(missing)}")
                rows.append((int(order), _parse_float(x), _parse_float(y)))
            except ValueError as exc:
                raise SlideError(slide_id, path, f"annotation {name!r}: bad <Coordinate>: {exc}")
        if len(rows) < 3:
            log.warning(
                "%s: annotation %r (group %s) has %d point(s), fewer than 3: skipped",
                path,
                name,
                group,
                len(rows),
            )
            continue
        rows.sort(key=lambda r: r[0])  # stable: equal orders keep file order
        xy = np.array([(x, y) for _, x, y in rows], dtype=np.float64)
        annotations.append(Annotation(name=name, group=group, level0_xy=xy))
    return annotations


def write_asap_xml(
    path: str | Path, annotations: Sequence[Annotation], comment: str | None = None
) -> None:
    """Write Camelyon16-style ASAP XML (``Type="Polygon"``, groups listed), atomically.

    Coordinates are written with ``repr`` precision so :func:`read_asap_xml` returns them exactly.
    ``comment`` (e.g. provenance) goes into an XML comment at the top of the root element.
    """
    root = ET.Element("ASAP_Annotations")
    if comment:
        root.append(ET.Comment(" " + comment.replace("--", "- -") + " "))
    annos = ET.SubElement(root, "Annotations")
    for ann in annotations:
        xy = np.asarray(ann.level0_xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"annotation {ann.name!r}: level0_xy must be (N, 2), got {xy.shape}")
        elem = ET.SubElement(
            annos,
            "Annotation",
            Name=ann.name,
            Type="Polygon",
            PartOfGroup=ann.group,
            Color=_ANNOTATION_COLOUR.get(ann.group, _DEFAULT_ANNOTATION_COLOUR),
        )
        coords = ET.SubElement(elem, "Coordinates")
        for order, (x, y) in enumerate(xy.tolist()):
            ET.SubElement(coords, "Coordinate", Order=str(order), X=repr(x), Y=repr(y))
    groups = ET.SubElement(root, "AnnotationGroups")
    for name in dict.fromkeys(a.group for a in annotations):  # first-seen order, unique
        group = ET.SubElement(
            groups, "Group", Name=name, PartOfGroup="None", Color=_GROUP_COLOUR.get(name, "#64FE2E")
        )
        ET.SubElement(group, "Attributes")
    ET.indent(root, space="\t")
    data = ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
    write_bytes(path, data)


# -- groups and rasters --------------------------------------------------------------------------
def split_groups(
    annotations: Sequence[Annotation], groups: AnnotationGroups = DEFAULT_GROUPS
) -> tuple[list[Annotation], list[Annotation]]:
    """Return ``(tumour, exclusions)`` by group; other groups are dropped with a warning."""
    tumour = [a for a in annotations if a.group in groups.tumour]
    exclusions = [a for a in annotations if a.group in groups.exclusion]
    other = sorted({a.group for a in annotations} - set(groups.tumour) - set(groups.exclusion))
    if other:
        log.warning(
            "annotation group(s) %s are neither tumour %s nor exclusion %s: ignored",
            other,
            list(groups.tumour),
            list(groups.exclusion),
        )
    return tumour, exclusions


def _pixels(level0_xy: np.ndarray, downsample: float, shape: tuple[int, int]):
    """``(rows, cols)`` of the raster pixels whose centres lie inside the polygon."""
    xy = np.asarray(level0_xy, dtype=np.float64)
    # level-0 x maps to x / downsample; pixel j's centre is at j + 0.5 in those units
    return draw_polygon(xy[:, 1] / downsample - 0.5, xy[:, 0] / downsample - 0.5, shape)


def _fill(mask: np.ndarray, ann: Annotation, downsample: float, value: bool) -> None:
    """Set pixels of ``mask`` whose centres lie inside ``ann`` (and outside its holes)."""
    rr, cc = _pixels(ann.level0_xy, downsample, mask.shape)
    if ann.holes and rr.size:
        r0, c0 = int(rr.min()), int(cc.min())
        window = (int(rr.max()) - r0 + 1, int(cc.max()) - c0 + 1)
        in_hole = np.zeros(window, dtype=bool)
        for hole in ann.holes:
            shifted = np.asarray(hole, dtype=np.float64) - (c0 * downsample, r0 * downsample)
            hr, hc = _pixels(shifted, downsample, window)
            in_hole[hr, hc] = True
        keep = ~in_hole[rr - r0, cc - c0]
        rr, cc = rr[keep], cc[keep]
    mask[rr, cc] = value


def fill_polygon(
    mask: np.ndarray,
    level0_xy: np.ndarray,
    origin_xy: tuple[float, float],
    scale: float = 1.0,
    value: bool = True,
) -> None:
    """Set ``mask`` pixels whose centres lie inside a polygon (even-odd rule), by scanlines.

    With ``origin_xy = (x0, y0)``, ``mask`` pixel ``(i, j)`` covers level-0
    ``[x0 + j*scale, x0 + (j+1)*scale)`` (same in y): the convention of :func:`rasterize`, whose
    result this equals (tested). ``value=False`` clears instead. The cost grows with rows x edges,
    not area x edges, so it suits large masks and long polygons.
    """
    h, w = mask.shape
    x = (level0_xy[:, 0] - origin_xy[0]) / scale - 0.5
    y = (level0_xy[:, 1] - origin_xy[1]) / scale - 0.5
    r0 = max(0, math.ceil(y.min()))
    r1 = min(h - 1, math.floor(y.max()))
    if r0 > r1 or x.max() < 0 or x.min() > w - 1:
        return
    rows = np.arange(r0, r1 + 1, dtype=np.float64)
    xa, ya = x, y
    xb, yb = np.roll(x, -1), np.roll(y, -1)
    below_a = ya[None, :] <= rows[:, None]
    below_b = yb[None, :] <= rows[:, None]
    ri, ei = np.nonzero(below_a != below_b)  # edge crosses the row (half-open in y)
    if ri.size == 0:
        return
    t = (rows[ri] - ya[ei]) / (yb[ei] - ya[ei])
    xc = xa[ei] + t * (xb[ei] - xa[ei])
    start = np.clip(np.ceil(xc), 0, w).astype(np.int64)  # first pixel centre right of crossing
    nrows = r1 - r0 + 1
    counts = np.bincount(ri * (w + 1) + start, minlength=nrows * (w + 1)).reshape(nrows, w + 1)
    inside = (np.cumsum(counts[:, :w], axis=1) & 1).astype(bool)
    if value:
        mask[r0 : r1 + 1] |= inside
    else:
        mask[r0 : r1 + 1] &= ~inside


def rasterize(
    annotations: Sequence[Annotation],
    shape_hw: tuple[int, int],
    downsample: float,
    groups: AnnotationGroups = DEFAULT_GROUPS,
) -> np.ndarray:
    """Tumour polygons minus exclusions as a bool ``(H, W)`` raster at ``downsample``.

    Level-0 coordinate ``x`` maps to ``x / downsample``; a pixel is set when its centre is inside
    a tumour polygon and outside its holes, then cleared when inside an exclusion (see the module
    docstring). Parts outside ``shape_hw`` are clipped.
    """
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    mask = np.zeros(tuple(int(v) for v in shape_hw), dtype=bool)
    tumour, exclusions = split_groups(annotations, groups)
    for ann in tumour:
        _fill(mask, ann, downsample, True)
    for ann in exclusions:
        _fill(mask, ann, downsample, False)
    return mask


# -- what the stages read --------------------------------------------------------------------------
def read_annotations(path: str | Path, slide_id: str | None = None) -> list[Annotation]:
    """The polygons of an ASAP XML (``.xml``) or GeoJSON (``.geojson``, ``.json``) file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in ASAP_SUFFIXES:
        return read_asap_xml(path, slide_id)
    if suffix in GEOJSON_SUFFIXES:
        return read_geojson(path, slide_id)
    raise SlideError(
        slide_id,
        path,
        f"not a polygon annotation file: the name must end in {ASAP_SUFFIXES + GEOJSON_SUFFIXES} "
        "(ASAP XML, QuPath GeoJSON); a ground-truth mask TIFF is read by the evaluation only",
    )


def check_on_slide(
    annotations: Sequence[Annotation],
    slide_wh: tuple[int, int],
    path: str | Path,
    slide_id: str | None = None,
) -> tuple[list[Annotation], list[str]]:
    """``(polygons that reach into the slide, names of those entirely outside it)``.

    A vertex farther outside the ``(w, h)`` px slide than the slide's own width (height) cannot be
    one of its pixels (wrong slide, wrong units, a corrupt number): :class:`SlideError` naming it.
    """
    w, h = (float(v) for v in slide_wh)
    low = np.array([-OUTSIDE_MARGIN * w, -OUTSIDE_MARGIN * h])
    high = np.array([(1 + OUTSIDE_MARGIN) * w, (1 + OUTSIDE_MARGIN) * h])
    kept, outside = [], []
    for ann in annotations:
        for ring in (ann.level0_xy, *ann.holes):
            far = np.flatnonzero(np.any((ring < low) | (ring > high), axis=1))
            if far.size:
                x, y = ring[far[0]]
                raise SlideError(
                    slide_id,
                    path,
                    f"annotation {ann.name!r} has a vertex at ({x:.6g}, {y:.6g}), far outside the "
                    f"{int(w)}x{int(h)} px slide: not a pixel of it (another slide's annotation, "
                    "other units, or a corrupt number?)",
                )
        xy = ann.level0_xy
        if xy[:, 0].min() >= w or xy[:, 1].min() >= h or xy[:, 0].max() < 0 or xy[:, 1].max() < 0:
            outside.append(ann.name)
        else:
            kept.append(ann)
    return kept, outside


def read_slide_annotations(
    path: str | Path,
    slide_wh: tuple[int, int],
    *,
    slide_id: str | None = None,
    groups: AnnotationGroups = DEFAULT_GROUPS,
    tumour_slide: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[Annotation]:
    """The tumour and exclusion polygons of one slide's annotation file, checked against the slide.

    Reads :func:`read_annotations`; refuses vertices that cannot be pixels of the ``(w, h)`` px
    slide (:func:`check_on_slide`); leaves out polygons entirely outside it and polygons of other
    groups, reported through ``warn`` (default: the log). A ``tumour_slide`` whose file yields no
    tumour polygon on the slide (an empty file, other group names, all outside) is a
    :class:`SlideError` naming the groups found: it would count as a tumour slide without lesions.
    """
    warn = warn or log.warning
    everything = read_annotations(path, slide_id)
    on_slide, outside = check_on_slide(everything, slide_wh, path, slide_id)
    w, h = slide_wh
    if outside:
        warn(
            f"slide {slide_id}: {len(outside)} annotation polygon(s) of {path} lie outside the "
            f"{w}x{h} px slide and are ignored: {outside[:5]}"
        )
    known = set(groups.tumour) | set(groups.exclusion)
    other = sorted({a.group for a in on_slide} - known)
    if other:
        warn(
            f"slide {slide_id}: annotation group(s) {other} of {path} are neither tumour "
            f"{list(groups.tumour)} nor exclusion {list(groups.exclusion)}: ignored "
            "(config annotation.tumour_groups, annotation.exclusion_groups)"
        )
    kept = [a for a in on_slide if a.group in known]
    if tumour_slide and not any(a.group in groups.tumour for a in kept):
        found = sorted({a.group for a in everything})
        if not everything:
            why = "the file holds no polygon"
        elif any(a.group in groups.tumour for a in everything):
            why = f"its tumour polygons all lie outside the {w}x{h} px slide"
        else:
            why = (
                f"no polygon is in a tumour group {list(groups.tumour)} (groups found: {found}); "
                "set annotation.tumour_groups (Camelyon17 XML: metastases)"
            )
        raise SlideError(slide_id, path, f"tumour slide without a tumour annotation: {why}")
    return kept


# -- GeoJSON -------------------------------------------------------------------------------------
#: Geometry types without an area: skipped with a warning (QuPath points, lines).
_NOT_AREAS = ("Point", "MultiPoint", "LineString", "MultiLineString", "GeometryCollection")


class _GeoJSONError(ValueError):
    """A structural problem of a GeoJSON file (becomes a :class:`SlideError`)."""


def _reject_constant(name: str) -> float:
    raise _GeoJSONError(f"{name} is not a number GeoJSON allows")


def read_geojson(path: str | Path, slide_id: str | None = None) -> list[Annotation]:
    """Read the polygons of a QuPath-style GeoJSON file (level-0 pixel coordinates).

    Accepts a ``FeatureCollection``, a single ``Feature`` or a list of features (QuPath writes all
    three). Each ``Polygon`` feature becomes an :class:`Annotation` (interior rings are its holes),
    each part of a ``MultiPolygon`` one more; the group is ``properties.classification.name``
    (QuPath; ``names`` joined by ``": "``, or a plain string), ``""`` when unclassified; the name is
    ``properties.name``, else the feature's ``id``, else ``Feature <k>``. Features without an area
    (points, lines: one warning per kind) or without a geometry, and rings of fewer than 3
    distinct vertices, are skipped with a warning. Malformed JSON or GeoJSON structure,
    ``NaN``/``Infinity`` and non-numeric or non-finite coordinates raise :class:`SlideError`
    naming the feature.
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise SlideError(slide_id, path, "annotation file not found")
    except OSError as exc:
        raise SlideError(slide_id, path, f"cannot read annotation file: {exc}")
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except _GeoJSONError as exc:
        raise SlideError(slide_id, path, f"malformed GeoJSON: {exc}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlideError(slide_id, path, f"malformed GeoJSON (not JSON text): {exc}")
    try:
        return _geojson_annotations(doc, path)
    except _GeoJSONError as exc:
        raise SlideError(slide_id, path, f"malformed GeoJSON: {exc}")


def _geojson_features(doc: Any) -> list[Any]:
    if isinstance(doc, list):
        return doc
    if not isinstance(doc, dict):
        raise _GeoJSONError(f"expected a FeatureCollection, got a JSON {type(doc).__name__}")
    kind = doc.get("type")
    if kind == "Feature":
        return [doc]
    if kind != "FeatureCollection":
        raise _GeoJSONError(f"expected a FeatureCollection or a Feature, got type {kind!r}")
    features = doc.get("features")
    if not isinstance(features, list):
        raise _GeoJSONError("the FeatureCollection has no list of features")
    return features


def _geojson_group(properties: dict) -> str:
    cls = properties.get("classification")
    if cls is None:
        return ""
    if isinstance(cls, str):
        return cls
    if isinstance(cls, dict):
        if isinstance(cls.get("name"), str):
            return cls["name"]
        names = cls.get("names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return ": ".join(names)
    raise _GeoJSONError(f"classification {cls!r} has no name")


def _geojson_ring(ring: Any, where: str) -> np.ndarray | None:
    """A linear ring as ``(N, 2)`` float64 without the closing position; None when degenerate."""
    if not isinstance(ring, list) or not all(isinstance(p, list) for p in ring):
        raise _GeoJSONError(f"{where}: a ring must be a list of [x, y] positions")
    xy = []
    for p in ring:
        if len(p) < 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in p[:2]
        ):
            raise _GeoJSONError(f"{where}: position {p!r} is not [x, y] numbers")
        try:
            xy.append((float(p[0]), float(p[1])))
        except OverflowError:
            raise _GeoJSONError(f"{where}: coordinate {p[:2]!r} is not a finite number") from None
    arr = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(arr)):
        raise _GeoJSONError(f"{where}: non-finite coordinate")
    if len(arr) > 1 and np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1]
    if len(np.unique(arr, axis=0)) < 3:
        return None
    return arr


def _geojson_annotations(doc: Any, path: Path) -> list[Annotation]:
    annotations: list[Annotation] = []
    not_areas: dict[str, list[str]] = {}
    for k, feat in enumerate(_geojson_features(doc)):
        if not isinstance(feat, dict) or feat.get("type") != "Feature":
            raise _GeoJSONError(f"feature {k} is not a GeoJSON Feature")
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise _GeoJSONError(f"feature {k}: properties must be an object")
        name = str(props.get("name") or feat.get("id") or f"Feature {k}")
        where = f"feature {k} ({name!r})"
        group = _geojson_group(props)
        geom = feat.get("geometry")
        if geom is None:
            log.warning("%s: %s has no geometry: skipped", path, where)
            continue
        if not isinstance(geom, dict) or "type" not in geom:
            raise _GeoJSONError(f"{where}: geometry must be an object with a type")
        kind, coords = geom["type"], geom.get("coordinates")
        if kind in _NOT_AREAS:
            not_areas.setdefault(kind, []).append(name)
            continue
        if kind == "Polygon":
            parts = [coords]
        elif kind == "MultiPolygon":
            if not isinstance(coords, list):
                raise _GeoJSONError(f"{where}: MultiPolygon coordinates must be a list")
            parts = coords
        else:
            raise _GeoJSONError(f"{where}: unknown geometry type {kind!r}")
        for j, rings in enumerate(parts):
            part = f"{where} part {j}" if kind == "MultiPolygon" else where
            if not isinstance(rings, list) or not rings:
                raise _GeoJSONError(f"{part}: a polygon must be a non-empty list of rings")
            outer = _geojson_ring(rings[0], part)
            if outer is None:
                log.warning("%s: %s has fewer than 3 distinct vertices: skipped", path, part)
                continue
            holes = [_geojson_ring(r, f"{part} hole {i}") for i, r in enumerate(rings[1:])]
            annotations.append(
                Annotation(
                    name=name if kind == "Polygon" else f"{name} part {j}",
                    group=group,
                    level0_xy=outer,
                    holes=tuple(h for h in holes if h is not None),
                )
            )
    for kind, names in not_areas.items():  # one line per kind (detect's exports hold many points)
        log.warning(
            "%s: %d %s feature(s) are not areas: skipped (%s)",
            path, len(names), kind, ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else ""),
        )  # fmt: skip
    return annotations


def write_geojson(
    path: str | Path,
    polygons_level0_xy: Sequence[np.ndarray],
    properties: Sequence[dict] | None = None,
    classification: str = "Tumor",
    metadata: dict | None = None,
) -> None:
    """Write polygons as a QuPath-importable GeoJSON FeatureCollection, atomically.

    Each polygon (``(N, 2)`` level-0 ``x, y``, N >= 3) becomes a ``Polygon`` feature with a closed
    ring, ``properties.objectType = "annotation"`` and ``properties.classification`` (name and RGB
    colour); ``properties[i]`` (if given) is merged into feature ``i``'s properties. ``metadata``
    (provenance) is stored as the collection's foreign member ``"wsiscan"``, which GeoJSON readers
    (QuPath included) ignore.
    """
    if properties is not None and len(properties) != len(polygons_level0_xy):
        raise ValueError(f"{len(properties)} property dicts for {len(polygons_level0_xy)} polygons")
    colour = _CLASS_RGB.get(classification, [255, 160, 0])
    features = []
    for i, poly in enumerate(polygons_level0_xy):
        xy = np.asarray(poly, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) < 3:
            raise ValueError(f"polygon {i}: need an (N >= 3, 2) array, got shape {xy.shape}")
        if not np.all(np.isfinite(xy)):
            raise ValueError(f"polygon {i}: non-finite coordinates")
        ring = xy.tolist()
        if ring[0] != ring[-1]:
            ring.append(list(ring[0]))
        props: dict = {
            "objectType": "annotation",
            "classification": {"name": classification, "color": list(colour)},
        }
        if properties is not None:
            props.update(properties[i])
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": props,
            }
        )
    doc: dict = {"type": "FeatureCollection", "features": features}
    if metadata:
        doc["wsiscan"] = metadata
    write_bytes(path, json.dumps(doc, indent=1).encode("utf-8") + b"\n")
