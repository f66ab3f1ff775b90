"""Lesion annotations: ASAP XML in and out, QuPath GeoJSON out, polygons to rasters.

Coordinates are level-0 pixels (``level0_xy``: an ``(N, 2)`` float64 array of ``x, y``), as in the
Camelyon16 ASAP XML files. Groups follow Camelyon16: ``Tumor``, ``_0`` and ``_1`` are tumour,
``_2`` marks non-tumour regions cut out of the tumour annotations.

Raster convention (shared with the scan grid): pixel ``(i, j)`` of a raster at ``downsample`` covers
level-0 ``[j*downsample, (j+1)*downsample) x [i*downsample, (i+1)*downsample)`` and is set when its
centre lies inside the polygon (even-odd rule).
"""

from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET  # noqa: S405  (building and writing only; parsing uses defusedxml)
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import defusedxml.ElementTree
import numpy as np
from skimage.draw import polygon as draw_polygon

from .errors import SlideError
from .fileio import write_bytes

log = logging.getLogger(__name__)

TUMOUR_GROUPS = ("Tumor", "_0", "_1")
EXCLUSION_GROUPS = ("_2",)

#: Annotation colours as ASAP and the Camelyon16 files write them.
_ANNOTATION_COLOUR = {"_2": "#64FE2E"}
_DEFAULT_ANNOTATION_COLOUR = "#F4FA58"
_GROUP_COLOUR = {"Tumor": "#FF0000", "_0": "#FF0000", "_1": "#FF0000", "_2": "#00FF00"}

#: GeoJSON classification colours (RGB) that QuPath shows.
_CLASS_RGB = {"Tumor": [200, 0, 0], "Exclusion": [0, 160, 0], "Normal": [0, 120, 200]}


@dataclass
class Annotation:
    """One polygon annotation: its name, ASAP group and vertices in level-0 pixels."""

    name: str
    group: str
    level0_xy: np.ndarray  # (N, 2) float64, x, y level-0 px

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Annotation):
            return NotImplemented
        return (
            self.name == other.name
            and self.group == other.group
            and self.level0_xy.shape == other.level0_xy.shape
            and bool(np.array_equal(self.level0_xy, other.level0_xy))
        )


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
def split_groups(annotations: Sequence[Annotation]) -> tuple[list[Annotation], list[Annotation]]:
    """Return ``(tumour, exclusions)`` by Camelyon16 group; other groups are dropped with a warning."""
    tumour = [a for a in annotations if a.group in TUMOUR_GROUPS]
    exclusions = [a for a in annotations if a.group in EXCLUSION_GROUPS]
    other = sorted({a.group for a in annotations} - set(TUMOUR_GROUPS) - set(EXCLUSION_GROUPS))
    if other:
        log.warning(
            "annotation group(s) %s are neither tumour %s nor exclusion %s: ignored",
            other,
            TUMOUR_GROUPS,
            EXCLUSION_GROUPS,
        )
    return tumour, exclusions


def _fill(mask: np.ndarray, level0_xy: np.ndarray, downsample: float, value: bool) -> None:
    """Set pixels of ``mask`` whose centres lie inside the polygon to ``value``."""
    xy = np.asarray(level0_xy, dtype=np.float64)
    # level-0 x maps to x / downsample; pixel j's centre is at j + 0.5 in those units
    rr, cc = draw_polygon(xy[:, 1] / downsample - 0.5, xy[:, 0] / downsample - 0.5, mask.shape)
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
    annotations: Sequence[Annotation], shape_hw: tuple[int, int], downsample: float
) -> np.ndarray:
    """Tumour polygons minus ``_2`` exclusions as a bool ``(H, W)`` raster at ``downsample``.

    Level-0 coordinate ``x`` maps to ``x / downsample``; a pixel is set when its centre is inside
    (see the module docstring). Parts outside ``shape_hw`` are clipped.
    """
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    mask = np.zeros(tuple(int(v) for v in shape_hw), dtype=bool)
    tumour, exclusions = split_groups(annotations)
    for ann in tumour:
        _fill(mask, ann.level0_xy, downsample, True)
    for ann in exclusions:
        _fill(mask, ann.level0_xy, downsample, False)
    return mask


# -- GeoJSON -------------------------------------------------------------------------------------
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
