"""``results/{slide}/lesions.geojson`` and ``outlines.geojson``: detections as QuPath reads them
(written by ``detect``; QuPath imports them as annotations over the slide).

Layout (a GeoJSON FeatureCollection, RFC 7946 structure, compact JSON without spaces):

* coordinates are level-0 slide pixels, x to the right and y down, as QuPath exports them (not
  longitude and latitude);
* every feature is ``{"type": "Feature", "geometry": ..., "properties": {"objectType":
  "annotation", "name": ..., "classification": {"name": ..., "color": [r, g, b]},
  "measurements": {name: number, ...}, "isLocked": false}}``: QuPath shows the name and the class,
  and lists the measurements in its measurement table (numbers only, so a size category is a
  number there and a word in the name);
* regions are ``Polygon`` geometries: the exterior ring counter-clockwise in those coordinates
  (positive shoelace area), then the holes clockwise, every ring closed; a region's stated area
  is the area of that polygon (the exterior minus the holes);
* lesion candidates (the points the FROC scores, ``lesions.csv``) are ``Point`` geometries, one
  feature each, so that each carries its own confidence;
* the collection's foreign member ``"wsiscan"`` holds provenance (slide, model, settings), which
  GeoJSON readers, QuPath included, ignore.

:func:`write_feature_collection` writes a collection built from :func:`polygon_feature` and
:func:`point_feature`; :func:`read_feature_collection` reads one back, checked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError
from ..fileio import write_bytes


def ring_area(ring_xy: np.ndarray) -> float:
    """Signed shoelace area of a ring ``(N, 2)`` (closed or not): positive counter-clockwise
    in x-right, y-down numbers as in the RFC's x-right, y-up ones (the formula is the same)."""
    xy = np.asarray(ring_xy, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0


def polygon_area(rings_xy: Sequence[np.ndarray]) -> float:
    """Area of a polygon: its exterior ring minus its holes (absolute values)."""
    if not rings_xy:
        return 0.0
    return abs(ring_area(rings_xy[0])) - sum(abs(ring_area(r)) for r in rings_xy[1:])


def _closed(ring_xy: np.ndarray, ccw: bool) -> list[list[float]]:
    xy = np.asarray(ring_xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) < 3:
        raise ValueError(f"a ring needs an (N >= 3, 2) array, got shape {xy.shape}")
    if not np.all(np.isfinite(xy)):
        raise ValueError("a ring has non-finite coordinates")
    if np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]
    if (ring_area(xy) > 0) != ccw:
        xy = xy[::-1]
    ring = [[round(float(x), 3), round(float(y), 3)] for x, y in xy]
    return [*ring, ring[0]]


def _properties(
    name: str, classification: str, color: Sequence[int], measurements: Mapping[str, float]
) -> dict[str, Any]:
    for key, value in measurements.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise ValueError(f"measurement {key!r} must be a finite number, got {value!r}")
    return {
        "objectType": "annotation",
        "name": name,
        "classification": {"name": classification, "color": [int(c) for c in color]},
        "measurements": {k: float(v) for k, v in measurements.items()},
        "isLocked": False,
    }


def polygon_feature(
    rings_xy: Sequence[np.ndarray],
    *,
    name: str,
    classification: str,
    color: Sequence[int],
    measurements: Mapping[str, float],
) -> dict[str, Any]:
    """A region: ``rings_xy[0]`` the exterior, the rest its holes (level-0 px)."""
    rings = [_closed(r, ccw=(k == 0)) for k, r in enumerate(rings_xy)]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": rings},
        "properties": _properties(name, classification, color, measurements),
    }


def point_feature(
    xy: Sequence[float],
    *,
    name: str,
    classification: str,
    color: Sequence[int],
    measurements: Mapping[str, float],
) -> dict[str, Any]:
    """A point annotation at level-0 ``(x, y)``."""
    x, y = (float(v) for v in xy)
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [x, y]},
        "properties": _properties(name, classification, color, measurements),
    }


def write_feature_collection(
    path: str | Path, features: Sequence[dict[str, Any]], metadata: Mapping[str, Any] | None = None
) -> None:
    """Write ``features`` as one compact FeatureCollection (provenance in ``"wsiscan"``),
    atomically."""
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": list(features)}
    if metadata:
        doc["wsiscan"] = dict(metadata)
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    write_bytes(path, text.encode("utf-8") + b"\n")


def read_feature_collection(path: str | Path, slide_id: str | None = None) -> dict[str, Any]:
    """A FeatureCollection written by :func:`write_feature_collection`, checked: every feature a
    ``Polygon`` or ``Point`` annotation with a name, a class and numeric measurements."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(slide_id, path, "GeoJSON file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlideError(slide_id, path, f"not readable GeoJSON: {exc}")
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
        raise SlideError(slide_id, path, "not a GeoJSON FeatureCollection")
    for k, feat in enumerate(doc.get("features") or []):
        geom = (feat or {}).get("geometry") or {}
        props = (feat or {}).get("properties") or {}
        measurements = props.get("measurements")
        if (
            feat.get("type") != "Feature"
            or geom.get("type") not in ("Polygon", "Point")
            or props.get("objectType") != "annotation"
            or not isinstance(props.get("name"), str)
            or not isinstance((props.get("classification") or {}).get("name"), str)
            or not isinstance(measurements, dict)
            or not all(isinstance(v, int | float) for v in measurements.values())
        ):
            raise SlideError(slide_id, path, f"feature {k} is not a QuPath annotation feature")
    meta = doc.get("wsiscan") or {}
    if slide_id and meta.get("slide_id") not in (None, slide_id):
        raise SlideError(slide_id, path, f"GeoJSON belongs to slide {meta['slide_id']!r}")
    return doc
