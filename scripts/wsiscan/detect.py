"""Lesion points, slide score and region exports from a stitched probability map (``probmap.h5``).

Map convention (written by the stitch stage): cell ``(i, j)`` of ``prob`` covers level-0 pixels
``[j*s, (j+1)*s) x [i*s, (i+1)*s)`` with ``s = stride_px``, and holds the classifier's output for
the patch centred on the cell centre. A detection at cell ``(i, j)`` is therefore reported at
level-0 ``x = int((j + 0.5) * s)``, ``y = int((i + 0.5) * s)``, clamped into the slide.

Two ways to turn the map into lesion points (config ``detect.method``):

* ``nms``: iterative non-maximum suppression as NCRF and MONAI do it -- take the map maximum, emit
  it, suppress every cell whose centre lies within ``radius_um`` of it, repeat while the maximum is
  ``>= threshold`` (ties: the first cell in row-major order). :func:`nms_points` gives exactly the
  points of that loop, without rescanning the whole map per point.
* ``components``: one point per 8-connected component of the stitch stage's cleaned lesion mask, at
  the component's maximum probability.

Region exports (QuPath GeoJSON and ASAP XML) outline the components of the cleaned lesion mask,
holes included, with each region's area, longest diameter and size category (AJCC/Camelyon17,
:mod:`wsiscan.staging`); the candidate points are QuPath point annotations. For slide viewers the
stage also writes the map's outlines at ``detect.outline_levels`` (QuPath GeoJSON) and the map as
a pyramidal TIFF (:mod:`wsiscan.formats.overlay`), and the QC picture (:mod:`wsiscan.qc`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .formats.lesions import write_lesions_csv, write_score_json
from .formats.overlay import write_overlay_tiff
from .formats.probmap import ProbMap, read_probmap
from .formats.qupath import (
    point_feature,
    polygon_area,
    polygon_feature,
    ring_area,
    write_feature_collection,
)
from .params import DetectParams
from .staging import CATEGORIES, CATEGORY_NAMES, size_category

log = logging.getLogger(__name__)

SCORE_METHODS = ("max",)
#: ASAP group of exported detections: "_0" is the Camelyon16 tumour group, so ASAP shows the
#: regions with the usual tumour styling and an edited file can be fed back as ground truth.
ASAP_DETECTION_GROUP = "_0"
#: ASAP group of the holes of exported regions: Camelyon16's exclusion group.
ASAP_EXCLUSION_GROUP = "_2"
#: The perceptually uniform colour map of the QC picture and of the outline classes.
QC_COLORMAP = "magma"


# -- lesion points ---------------------------------------------------------------------------------
def cells_to_level0_xy(
    rows: np.ndarray,
    cols: np.ndarray,
    stride_px: float,
    slide_wh: tuple[int, int] | None = None,
) -> np.ndarray:
    """Level-0 ``(x, y)`` int64 pixels of the centres of map cells ``(rows, cols)``.

    ``x = int((col + 0.5) * stride_px)``; with ``slide_wh`` the points are clamped into the slide
    (the last map cell may reach past the slide border).
    """
    xy = np.stack(
        [
            np.floor((np.asarray(cols, dtype=np.float64) + 0.5) * stride_px),
            np.floor((np.asarray(rows, dtype=np.float64) + 0.5) * stride_px),
        ],
        axis=-1,
    ).astype(np.int64)
    if slide_wh is not None and len(xy):
        xy[:, 0] = np.clip(xy[:, 0], 0, max(int(slide_wh[0]) - 1, 0))
        xy[:, 1] = np.clip(xy[:, 1], 0, max(int(slide_wh[1]) - 1, 0))
    return xy.reshape(-1, 2)


def _disk_offsets(radius_cells: float) -> tuple[np.ndarray, np.ndarray]:
    """Row/col offsets of the cells whose centres lie within ``radius_cells`` (inclusive)."""
    r = int(np.floor(radius_cells))
    di, dj = np.mgrid[-r : r + 1, -r : r + 1]
    keep = di.astype(np.float64) ** 2 + dj.astype(np.float64) ** 2 <= radius_cells**2
    return di[keep], dj[keep]


def nms_cells(prob: np.ndarray, *, threshold: float, radius_cells: float) -> np.ndarray:
    """Iterative NMS on a 2-D map in cell units; returns ``(K, 3)`` float64 ``[value, row, col]``.

    Exactly the points of the plain loop "take the maximum (first in row-major order on ties),
    emit it, remove every cell within ``radius_cells`` of it (centre distance, inclusive), repeat
    while the maximum is ``>= threshold``". Implemented as a greedy pass over the cells
    ``>= threshold`` sorted by (value descending, row-major index), skipping removed cells: the
    next emitted point of the loop is always the first cell of that order not yet removed.
    Removed cells are never emitted again (the same as NCRF's zeroing for ``threshold > 0``, and
    well defined for ``threshold = 0``). Unlike NCRF's square box (and its ``>``), the suppressed
    region is a disk and the stop test ``>=``.
    """
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"prob must be 2-D, got shape {prob.shape}")
    h, w = prob.shape
    flat = prob.ravel()
    cand = np.flatnonzero(flat >= threshold)
    if cand.size == 0:
        return np.zeros((0, 3), dtype=np.float64)
    # stable sort of -value keeps row-major order among equal values
    cand = cand[np.argsort(-flat[cand], kind="stable")]
    di, dj = _disk_offsets(radius_cells)
    removed = np.zeros(h * w, dtype=bool)
    out: list[tuple[float, int, int]] = []
    ptr, chunk = 0, 256
    while ptr < cand.size:
        window = cand[ptr : ptr + chunk]
        free = np.flatnonzero(~removed[window])
        if free.size == 0:
            ptr += window.size
            chunk = min(chunk * 2, 1 << 20)
            continue
        ptr += int(free[0])
        chunk = 256
        k = int(cand[ptr])
        i, j = divmod(k, w)
        out.append((float(flat[k]), i, j))
        ii, jj = i + di, j + dj
        inside = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
        removed[ii[inside] * w + jj[inside]] = True
        ptr += 1
    return np.asarray(out, dtype=np.float64).reshape(-1, 3)


def nms_points(
    prob: np.ndarray,
    stride_px: float,
    mpp: float,
    *,
    threshold: float,
    radius_um: float,
    slide_wh: tuple[int, int] | None = None,
) -> np.ndarray:
    """Lesion points by iterative NMS; ``(K, 3)`` float64 ``[confidence, x, y]`` (level-0 px).

    ``radius_um`` is the suppression radius in micrometres (``radius_um / (mpp * stride_px)``
    cells, centre distance); see :func:`nms_cells`. Sorted by confidence, descending.
    """
    if radius_um < 0:
        raise ValueError(f"radius_um must be >= 0, got {radius_um}")
    cells = nms_cells(prob, threshold=threshold, radius_cells=radius_um / (mpp * stride_px))
    return _points(cells, stride_px, slide_wh)


def _points(cells: np.ndarray, stride_px: float, slide_wh: tuple[int, int] | None) -> np.ndarray:
    xy = cells_to_level0_xy(cells[:, 1], cells[:, 2], stride_px, slide_wh)
    return np.column_stack([cells[:, 0], xy.astype(np.float64)]).reshape(-1, 3)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels of a boolean mask (``skimage.measure.label``) and their count."""
    from skimage.measure import label

    labels, n = label(np.asarray(mask, dtype=bool), connectivity=2, return_num=True)
    return labels, int(n)


def component_cells(
    prob: np.ndarray, mask: np.ndarray, *, min_cells: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 8-connected component of ``mask`` with ``>= min_cells`` cells: its maximum.

    Returns ``(cells (K, 3) [max value, row, col of the first maximum in row-major order], label
    ids (K,), sizes (K,) in cells)``, sorted by value descending (ties: row-major position).
    """
    prob = np.asarray(prob)
    labels, n = label_components(mask)
    empty = np.zeros((0, 3)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if n == 0:
        return empty
    flat_idx = np.flatnonzero(labels)
    lab = labels.ravel()[flat_idx]
    val = prob.ravel()[flat_idx].astype(np.float64)
    # per label: highest value first, then the first cell in row-major order
    order = np.lexsort((flat_idx, -val, lab))
    lab_sorted = lab[order]
    first = np.flatnonzero(np.r_[True, lab_sorted[1:] != lab_sorted[:-1]])
    ids = lab_sorted[first].astype(np.int64)
    sizes = np.diff(np.r_[first, lab_sorted.size]).astype(np.int64)
    best = order[first]
    keep = sizes >= min_cells
    if not keep.any():
        return empty
    ids, sizes, best = ids[keep], sizes[keep], best[keep]
    rows, cols = np.divmod(flat_idx[best], prob.shape[1])
    values = val[best]
    out_order = np.lexsort((cols, rows, -values))
    cells = np.column_stack([values, rows, cols]).astype(np.float64)[out_order]
    return cells, ids[out_order], sizes[out_order]


def component_points(
    prob: np.ndarray,
    mask_or_threshold: np.ndarray | float,
    stride_px: float,
    *,
    mpp: float | None = None,
    min_area_um2: float = 0.0,
    slide_wh: tuple[int, int] | None = None,
) -> np.ndarray:
    """Lesion points, one per 8-connected component; ``(K, 3)`` ``[confidence, x, y]`` level-0.

    ``mask_or_threshold`` is a boolean mask (the cleaned lesion mask) or a probability threshold
    (components of ``prob >= threshold``). Each component emits its maximum probability at the
    centre of its (first) maximum cell. Components smaller than ``min_area_um2`` are dropped
    (needs ``mpp``). Sorted by confidence, descending.
    """
    prob = np.asarray(prob)
    if np.ndim(mask_or_threshold) == 0:
        mask = prob >= float(mask_or_threshold)
    else:
        mask = np.asarray(mask_or_threshold, dtype=bool)
        if mask.shape != prob.shape:
            raise ValueError(f"mask shape {mask.shape} != prob shape {prob.shape}")
    min_cells = _min_cells(min_area_um2, stride_px, mpp)
    cells, _, _ = component_cells(prob, mask, min_cells=min_cells)
    return _points(cells, stride_px, slide_wh)


def _min_cells(min_area_um2: float, stride_px: float, mpp: float | None) -> int:
    if min_area_um2 <= 0:
        return 1
    if mpp is None:
        raise ValueError("min_area_um2 needs mpp")
    return max(1, int(np.ceil(min_area_um2 / (stride_px * mpp) ** 2 - 1e-9)))


def slide_score(prob: np.ndarray, method: str = "max") -> float:
    """Slide-level tumour score from the map: ``max`` = the maximum probability (0 if empty)."""
    if method not in SCORE_METHODS:
        raise ValueError(f"score method must be one of {SCORE_METHODS}, got {method!r}")
    prob = np.asarray(prob)
    return float(prob.max()) if prob.size else 0.0


# -- region outlines -------------------------------------------------------------------------------
@dataclass
class Region:
    """One detected region (a component of the lesion mask): its outline in level-0 px, its
    maximum probability, area and longest diameter."""

    rings_level0_xy: list[np.ndarray]  # exterior first, then holes; each (N, 2) float64, closed
    max_probability: float
    area_um2: float  # of the polygon: exterior minus holes
    n_cells: int
    longest_diameter_um: float  # max Feret diameter of the component's cells
    peak_level0_xy: tuple[int, int]  # centre of the (first) maximum cell

    @property
    def polygon_level0_xy(self) -> np.ndarray:
        """The exterior ring."""
        return self.rings_level0_xy[0]

    @property
    def category(self) -> str:
        """Size category of the region alone (:func:`wsiscan.staging.size_category`)."""
        return size_category(self.longest_diameter_um / 1000.0)

    def record(self) -> dict:
        """The region as ``score.json`` lists it."""
        return {
            "max_probability": round(self.max_probability, 6),
            "area_um2": round(self.area_um2, 3),
            "longest_diameter_um": round(self.longest_diameter_um, 3),
            "category": self.category,
            "n_cells": self.n_cells,
            "peak_level0_xy": list(self.peak_level0_xy),
        }


def mask_regions(
    prob: np.ndarray,
    mask: np.ndarray,
    stride_px: float,
    mpp: float,
    *,
    min_area_um2: float = 0.0,
) -> list[Region]:
    """Outlines and sizes of the 8-connected components of ``mask`` (level-0 polygons).

    Each component's outline and holes are traced with ``skimage.measure.find_contours`` at 0.5
    on the 1-cell-padded component (``fully_connected="high"``: diagonal neighbours stay one
    outline, holes are 4-connected); contour coordinates in cell units ``k`` map to level-0
    ``(k + 0.5) * stride_px``, i.e. the outline runs along cell borders, cut diagonally at
    corners. ``area_um2`` is the area of that polygon (exterior minus holes), so a QuPath
    measurement of the imported polygon agrees with it. The longest diameter is the maximum
    Feret diameter of the component's cells (``regionprops.feret_diameter_max``: the largest
    distance between two points of the convex hull of the cells' outline; a row of n cells
    measures n cells) times the cell side ``stride_px * mpp``: the map's resolution, one cell
    (``Sd * mpp`` um), bounds its precision. Components with fewer cells than ``min_area_um2``
    covers are left out. Sorted by max probability, descending.
    """
    from skimage.measure import find_contours, regionprops

    labels, n = label_components(mask)
    if n == 0:
        return []
    cell_um = stride_px * mpp
    min_cells = _min_cells(min_area_um2, stride_px, mpp)
    regions: list[Region] = []
    for rp in regionprops(labels, intensity_image=np.asarray(prob, dtype=np.float64)):
        if rp.area < min_cells:
            continue
        padded = np.pad(rp.image, 1).astype(np.float64)
        contours = find_contours(padded, 0.5, fully_connected="high")
        contours.sort(key=lambda c: -abs(ring_area(c)))
        r0, c0 = rp.bbox[0], rp.bbox[1]
        rings = []
        for contour in contours:
            xy = np.column_stack([contour[:, 1] - 1 + c0, contour[:, 0] - 1 + r0])
            xy = (xy + 0.5) * stride_px
            if not np.array_equal(xy[0], xy[-1]):
                xy = np.vstack([xy, xy[:1]])
            rings.append(xy)
        local = np.where(rp.image, rp.image_intensity, -np.inf)
        pi, pj = np.unravel_index(int(np.argmax(local)), local.shape)
        peak = cells_to_level0_xy(np.array([pi + r0]), np.array([pj + c0]), stride_px)[0]
        regions.append(
            Region(
                rings_level0_xy=rings,
                max_probability=float(rp.intensity_max),
                area_um2=polygon_area(rings) * mpp**2,
                n_cells=int(rp.area),
                longest_diameter_um=float(rp.feret_diameter_max) * cell_um,
                peak_level0_xy=(int(peak[0]), int(peak[1])),
            )
        )
    regions.sort(key=lambda r: -r.max_probability)
    return regions


#: QuPath classes (name, RGB colour) of the exported objects.
LESION_CLASS = ("Tumor", (200, 0, 0))
CANDIDATE_CLASS = ("Lesion candidate", (255, 200, 0))
#: QuPath measurement names of a region.
AREA_MEASUREMENT = "Area \u00b5m^2"
DIAMETER_MEASUREMENT = "Longest diameter \u00b5m"
CATEGORY_MEASUREMENT = "Size category (1 ITC, 2 micro, 3 macro)"


def region_feature(k: int, region: Region, name: str, classification=LESION_CLASS) -> dict:
    """A region as a QuPath annotation feature (:mod:`wsiscan.formats.qupath`)."""
    return polygon_feature(
        region.rings_level0_xy,
        name=name,
        classification=classification[0],
        color=classification[1],
        measurements={
            "Max probability": round(region.max_probability, 6),
            AREA_MEASUREMENT: round(region.area_um2, 3),
            DIAMETER_MEASUREMENT: round(region.longest_diameter_um, 3),
            CATEGORY_MEASUREMENT: CATEGORIES.index(region.category),
            "Cells": region.n_cells,
        },
    )


def lesion_features(regions: list[Region], points: np.ndarray) -> list[dict]:
    """The features of ``lesions.geojson``: every region (named by its rank, size and
    category) and every lesion candidate point (named by its rank and confidence)."""
    features = []
    for k, r in enumerate(regions, start=1):
        name = (
            f"Lesion {k}: {CATEGORY_NAMES[r.category]}, {r.longest_diameter_um / 1000:.2f} mm, "
            f"p={r.max_probability:.3f}"
        )
        features.append(region_feature(k, r, name))
    for k, (conf, x, y) in enumerate(np.asarray(points).reshape(-1, 3), start=1):
        features.append(
            point_feature(
                (x, y),
                name=f"Candidate {k} (p={conf:.3f})",
                classification=CANDIDATE_CLASS[0],
                color=CANDIDATE_CLASS[1],
                measurements={"Confidence": round(float(conf), 6)},
            )
        )
    return features


def outline_features(pm: ProbMap, levels: tuple[float, ...], min_area_um2: float) -> list[dict]:
    """The features of ``outlines.geojson``: the components of ``prob >= level`` for each level,
    one QuPath class per level (``Probability >= <level>``), warmer colours for higher levels."""
    import matplotlib

    cmap = matplotlib.colormaps[QC_COLORMAP]
    features = []
    for level in levels:
        regions = mask_regions(
            pm.prob, pm.prob >= level, pm.stride_px, pm.mpp, min_area_um2=min_area_um2
        )
        rgb = tuple(int(round(255 * c)) for c in cmap(float(level))[:3])
        cls = (f"Probability >= {level:g}", rgb)
        for k, r in enumerate(regions, start=1):
            features.append(region_feature(k, r, f"p >= {level:g}: region {k}", cls))
    return features


def write_region_exports(
    regions: list[Region],
    points: np.ndarray,
    out_geojson: str | Path,
    out_xml: str | Path,
    provenance: dict | None = None,
) -> None:
    """Write ``regions`` and the lesion candidate ``points`` as QuPath GeoJSON
    (:func:`lesion_features`) and the regions as ASAP XML, both atomically.

    ASAP annotations are named ``Detection <k> (p=<max>)`` in group :data:`ASAP_DETECTION_GROUP`
    (``_0``, the Camelyon16 tumour group); a region's holes are ``Detection <k> hole <j>`` in the
    exclusion group ``_2``, as Camelyon16 marks non-tumour inside a lesion. ``provenance``
    (slide, model checksum, version, parameters) goes into the GeoJSON's ``"wsiscan"`` member and
    an XML comment.
    """
    from .annotations import Annotation, write_asap_xml

    write_feature_collection(out_geojson, lesion_features(regions, points), metadata=provenance)
    anns = []
    for k, r in enumerate(regions):
        anns.append(
            Annotation(
                f"Detection {k} (p={r.max_probability:.3f})",
                ASAP_DETECTION_GROUP,
                r.rings_level0_xy[0][:-1],
            )
        )
        for j, hole in enumerate(r.rings_level0_xy[1:]):
            anns.append(Annotation(f"Detection {k} hole {j}", ASAP_EXCLUSION_GROUP, hole[:-1]))
    comment = None
    if provenance:
        comment = "wsiscan " + " ".join(f"{k}={v}" for k, v in provenance.items())
    write_asap_xml(out_xml, anns, comment=comment)


# -- the stage -------------------------------------------------------------------------------------
def detect(
    probmap: str | Path,
    out_lesions: str | Path,
    out_score: str | Path,
    out_geojson: str | Path,
    out_xml: str | Path,
    params: DetectParams,
    *,
    slide_id: str,
    out_outlines: str | Path | None = None,
    out_overlay: str | Path | None = None,
    out_qc: str | Path | None = None,
    slide: str | Path | None = None,
    mask: str | Path | None = None,
    annotation: str | Path | None = None,
) -> dict:
    """Stage ``detect``: lesion points, slide score, region exports and overlays of one slide.

    ``params.method`` ``nms`` (:func:`nms_points` with ``threshold`` and ``nms_radius_um``) or
    ``components`` (:func:`component_points` on the map's cleaned ``mask``, or ``prob >=
    threshold`` when the file has none; components below ``min_area_um2`` dropped). Region
    exports outline the same mask's components of at least ``min_area_um2``, with their sizes
    (:func:`mask_regions`). Writes ``lesions.csv`` (``confidence,x,y``, level-0 int px,
    confidence descending), ``score.json`` (with every region's size), ``lesions.geojson``
    (QuPath: regions and candidate points) and ``lesions.xml`` (ASAP); when given, the outlines
    at ``params.outline_levels`` (``out_outlines``, QuPath GeoJSON), the map as a pyramidal TIFF
    for viewers (``out_overlay``, :mod:`wsiscan.formats.overlay`) and the QC picture
    (``out_qc``: needs ``slide`` for the thumbnail; ``mask``, the tissue mask, outlines the
    confinement; ``annotation``, the ground truth). Returns the score record.
    """
    pm = read_probmap(probmap, slide_id)
    points = lesion_points(pm, params)
    lesion_mask = pm.mask if pm.mask is not None else pm.prob >= params.threshold
    regions = mask_regions(
        pm.prob, lesion_mask, pm.stride_px, pm.mpp, min_area_um2=params.min_area_um2
    )
    record = score_record(slide_id, pm, params, len(points), regions)
    write_lesions_csv(out_lesions, points)
    provenance_keys = (
        "slide_id", "model_checksum", "wsiscan_version", "method", "threshold", "nms_radius_um",
        "min_area_um2", "mask_threshold", "stride_px", "mpp",
    )  # fmt: skip
    provenance = {k: record[k] for k in provenance_keys}
    write_region_exports(regions, points, out_geojson, out_xml, provenance=provenance)
    if out_outlines is not None:
        features = outline_features(pm, params.outline_levels, params.min_area_um2)
        write_feature_collection(
            out_outlines, features, metadata={**provenance, "levels": list(params.outline_levels)}
        )
    if out_overlay is not None:
        write_overlay_tiff(
            out_overlay,
            pm.prob,
            stride_px=pm.stride_px,
            mpp=pm.mpp,
            slide_wh=(pm.slide_width, pm.slide_height),
            slide_id=slide_id,
        )
    if out_qc is not None:
        from .qc import draw_slide_qc

        draw_slide_qc(
            out_qc, pm, regions, points, slide=slide, tissue_mask=mask, annotation=annotation,
            params=params, slide_id=slide_id, probmap=probmap,
        )  # fmt: skip
    write_score_json(out_score, record)
    log.info(
        "slide %s: score %.4f, %d lesion points (%s), %d regions",
        slide_id,
        record["score"],
        record["n_lesions"],
        params.method,
        len(regions),
    )
    return record


def lesion_points(pm: ProbMap, params: DetectParams) -> np.ndarray:
    """``(K, 3) [confidence, x, y]`` (level-0 px) of the map by ``params.method``."""
    slide_wh = (pm.slide_width, pm.slide_height)
    if params.method == "nms":
        return nms_points(
            pm.prob,
            pm.stride_px,
            pm.mpp,
            threshold=params.threshold,
            radius_um=params.nms_radius_um,
            slide_wh=slide_wh,
        )
    mask = pm.mask if pm.mask is not None else pm.prob >= params.threshold
    return component_points(
        pm.prob, mask, pm.stride_px, mpp=pm.mpp, min_area_um2=params.min_area_um2, slide_wh=slide_wh
    )


def score_record(
    slide_id: str, pm: ProbMap, params: DetectParams, n_points: int, regions: list[Region]
) -> dict:
    """The content of ``score.json``: the score, how it and the points were made, and every
    region of the lesion mask with its size (``regions``, by max probability)."""
    return {
        "slide_id": slide_id,
        "score": slide_score(pm.prob, SCORE_METHODS[0]),
        "score_method": SCORE_METHODS[0],
        "n_lesions": int(n_points),
        "n_regions": len(regions),
        "method": params.method,
        "threshold": float(params.threshold),
        "nms_radius_um": float(params.nms_radius_um),
        "min_area_um2": float(params.min_area_um2),
        "mask_threshold": pm.mask_threshold,
        "stride_px": pm.stride_px,
        "mpp": pm.mpp,
        "slide_width": pm.slide_width,
        "slide_height": pm.slide_height,
        "model_checksum": pm.model_checksum,
        "wsiscan_version": __version__,
        "regions": [r.record() for r in regions],
    }
