"""The per-slide QC picture (``results/{slide}/qc/heatmap.png``, written by ``detect``): what a
pathologist needs to read it without help.

Over a thumbnail of the slide (about 12 um/px, :func:`wsiscan.stitch.slide_thumbnail`):

* the tumour probability in the perceptually uniform colour map ``magma``
  (:data:`wsiscan.detect.QC_COLORMAP`), drawn only from the lesion-mask threshold up (below it
  the map is transparent and the tissue shows as it is), each pixel the maximum of the map
  cells it covers, so that a small focus is not averaged away;
* the detected lesions: their outlines (white) and the lesion candidates that the FROC scores
  (cyan circles, the first ten numbered by confidence);
* the ground truth, when the slide has an annotation: the tumour outline (green) and the
  exclusions (dashed green); an annotation that cannot be read is named in the picture instead;
* the confinement to tissue (dashed grey: the map is zero outside) and the cells at or above the
  threshold it removed (black x);
* the slide ID, its score, the number of lesions and the largest one's longest diameter and size
  category in the title, axes in millimetres and a scale bar.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .errors import SlideError, WsiscanError
from .fileio import atomic_write
from .formats.probmap import ProbMap
from .params import DetectParams
from .staging import CATEGORY_NAMES, size_category

log = logging.getLogger(__name__)

QC_MAX_SIDE = 2000  #: the map is reduced to at most this many cells on its long side
GT_COLOUR = "#00d000"
LESION_COLOUR = "white"
CANDIDATE_COLOUR = "cyan"
NUMBERED_CANDIDATES = 10


def scale_bar_mm(width_mm: float) -> float:
    """A round scale-bar length (1, 2 or 5 times a power of ten, mm) near a fifth of the width."""
    target = max(width_mm / 5.0, 1e-6)
    exponent = math.floor(math.log10(target))
    for step in (5, 2, 1):
        if step * 10**exponent <= target:
            return float(step * 10**exponent)
    return float(10**exponent)


def _block_max(prob: np.ndarray, factor: int) -> np.ndarray:
    from skimage.measure import block_reduce

    if factor <= 1:
        return np.asarray(prob)
    return block_reduce(np.asarray(prob), (factor, factor), np.max, cval=0)


def _thumbnail(slide: str | Path | None, pm: ProbMap, slide_id: str) -> np.ndarray | None:
    if slide is None:
        return None
    from .slide import open_slide
    from .stitch import slide_thumbnail

    with open_slide(slide, slide_id, mpp_fallback=pm.mpp) as s:
        if tuple(s.dimensions) != (pm.slide_width, pm.slide_height):
            raise SlideError(
                slide_id,
                slide,
                f"the map was made for a {pm.slide_width}x{pm.slide_height} slide, but the slide "
                f"is {s.dimensions[0]}x{s.dimensions[1]}",
            )
        thumb, _ = slide_thumbnail(s)
    return thumb


def _ground_truth(annotation, pm: ProbMap, params: DetectParams, slide_id: str):
    """``(tumour rings, exclusion rings, problem)`` in level-0 px; rings of a mask TIFF are the
    contours of its downsample-32 tumour mask."""
    if not annotation:
        return [], [], None
    from .annotations import (
        ASAP_SUFFIXES,
        GEOJSON_SUFFIXES,
        AnnotationGroups,
        read_slide_annotations,
        split_groups,
    )

    path = Path(annotation)
    wh = (pm.slide_width, pm.slide_height)
    groups = AnnotationGroups.of(params)
    try:
        if path.suffix.lower() in ASAP_SUFFIXES + GEOJSON_SUFFIXES:
            anns = read_slide_annotations(path, wh, slide_id=slide_id, groups=groups)
            tumour, exclusion = split_groups(anns, groups)
            return (
                [a.level0_xy for a in tumour] + [h for a in tumour for h in a.holes],
                [a.level0_xy for a in exclusion],
                None,
            )
        from skimage.measure import find_contours

        from .evaluate import EVAL_DOWNSAMPLE, tumour_mask_from_tiff

        mask = tumour_mask_from_tiff(path, wh, slide_id=slide_id, tumour_slide=False)
        padded = np.pad(mask.astype(np.float32), 1)
        rings = [(c[:, ::-1] - 1 + 0.5) * EVAL_DOWNSAMPLE for c in find_contours(padded, 0.5)]
        return rings, [], None
    except WsiscanError as exc:
        log.warning("slide %s: ground truth not drawn: %s", slide_id, exc)
        return [], [], f"ground truth {path.name} unreadable"


def _masked_cells(probmap: str | Path | None) -> np.ndarray | None:
    if probmap is None:
        return None
    import h5py

    with h5py.File(probmap, "r") as f:
        return np.asarray(f["masked"][...]) > 0 if "masked" in f else None


def draw_slide_qc(
    png: str | Path,
    pm: ProbMap,
    regions: list,
    points: np.ndarray,
    *,
    params: DetectParams,
    slide_id: str,
    slide: str | Path | None = None,
    tissue_mask: str | Path | None = None,
    annotation: str | Path | None = None,
    probmap: str | Path | None = None,
) -> None:
    """Draw the QC picture of one slide (module docstring) to ``png``, atomically.

    ``regions`` (:class:`wsiscan.detect.Region`) and ``points`` (``(K, 3) [confidence, x, y]``)
    are the stage's detections; ``slide`` gives the thumbnail (none: white), ``tissue_mask`` the
    confinement outline, ``annotation`` the ground truth, ``probmap`` the removed cells."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    from .detect import QC_COLORMAP

    mm = pm.mpp / 1000.0  # mm per level-0 px
    W, H = pm.slide_width, pm.slide_height
    threshold = pm.mask_threshold if pm.mask_threshold is not None else params.threshold
    thumb = _thumbnail(slide, pm, slide_id)
    rows, cols = pm.prob.shape
    factor = max(1, math.ceil(max(rows, cols) / QC_MAX_SIDE))
    small = _block_max(pm.prob, factor)
    cell_mm = factor * pm.stride_px * mm
    tumour_rings, exclusion_rings, gt_problem = _ground_truth(annotation, pm, params, slide_id)

    aspect = H / W
    fig = Figure(figsize=(9.0, max(3.5, min(9.0 * aspect + 1.2, 14.0))), dpi=100)
    ax = fig.add_subplot()
    extent = (0, W * mm, H * mm, 0)
    if thumb is not None:
        ax.imshow(thumb, extent=extent, interpolation="bilinear")
    else:
        ax.set_facecolor("white")
    overlay = np.ma.masked_less(small, threshold)
    im = ax.imshow(
        overlay,
        extent=(0, small.shape[1] * cell_mm, small.shape[0] * cell_mm, 0),
        cmap=QC_COLORMAP,
        vmin=threshold,
        vmax=1.0,
        alpha=0.75,
        interpolation="nearest",
    )
    handles = []
    if tissue_mask is not None and pm.attrs.get("confine_to_tissue", False):
        from .stitch import allowed_region

        allowed, (dsx, dsy) = allowed_region(
            tissue_mask, slide_id, (W, H), pm.mpp, float(pm.attrs.get("tissue_margin_um", 0.0))
        )
        if allowed.any() and not allowed.all():
            h_mask, w_mask = allowed.shape
            ax.contour(
                allowed.astype(np.float32), levels=[0.5], colors="0.45", linewidths=0.8,
                linestyles="dashed", extent=(0, w_mask * dsx * mm, 0, h_mask * dsy * mm),
                origin="upper",
            )  # fmt: skip
            handles.append(Line2D([], [], color="0.45", ls="--", label="map confined to tissue"))
    removed = _masked_cells(probmap)
    if removed is not None and removed.any():
        ys, xs = np.nonzero(_block_max(removed, factor))
        ax.scatter((xs + 0.5) * cell_mm, (ys + 0.5) * cell_mm, s=10, marker="x", c="black")
        handles.append(
            Line2D([], [], color="black", marker="x", ls="", label="removed: outside tissue")
        )
    for ring in tumour_rings:
        ax.plot(ring[:, 0] * mm, ring[:, 1] * mm, color=GT_COLOUR, lw=1.4)
    for ring in exclusion_rings:
        ax.plot(ring[:, 0] * mm, ring[:, 1] * mm, color=GT_COLOUR, lw=1.0, ls="--")
    if tumour_rings:
        handles.append(Line2D([], [], color=GT_COLOUR, lw=1.4, label="ground truth"))
    for region in regions:
        for ring in region.rings_level0_xy:
            ax.plot(ring[:, 0] * mm, ring[:, 1] * mm, color=LESION_COLOUR, lw=0.9)
    if regions:
        handles.append(
            Line2D([], [], color=LESION_COLOUR, lw=0.9, label=f"lesion mask (p >= {threshold:g})")
        )
    pts = np.asarray(points).reshape(-1, 3)
    if len(pts):
        ax.scatter(
            pts[:, 1] * mm, pts[:, 2] * mm, s=60, facecolors="none", edgecolors=CANDIDATE_COLOUR,
            linewidths=1.2,
        )  # fmt: skip
        for k, (_, x, y) in enumerate(pts[:NUMBERED_CANDIDATES], start=1):
            ax.annotate(
                str(k), (x * mm, y * mm), xytext=(5, 5), textcoords="offset points",
                color=CANDIDATE_COLOUR, fontsize=8, fontweight="bold",
            )  # fmt: skip
        handles.append(
            Line2D([], [], color=CANDIDATE_COLOUR, marker="o", mfc="none", ls="",
                   label="lesion candidates (FROC points)")
        )  # fmt: skip
    bar = scale_bar_mm(W * mm)
    ax.add_artist(
        AnchoredSizeBar(
            ax.transData, bar, f"{bar:g} mm", "lower right", pad=0.4, color="black",
            frameon=True, size_vertical=max(H * mm / 150, 1e-6),
        )
    )  # fmt: skip
    ax.set_xlim(0, W * mm)
    ax.set_ylim(H * mm, 0)
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.set_title(_title(slide_id, pm, regions, len(pts), gt_problem), fontsize=10)
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.8)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(f"tumour probability (shown from {threshold:g})")
    fig.tight_layout()
    with atomic_write(png) as fh:
        fig.savefig(fh, format="png")


def _title(slide_id: str, pm: ProbMap, regions: list, n_points: int, problem: str | None) -> str:
    score = float(pm.prob.max()) if pm.prob.size else 0.0
    title = f"{slide_id}: slide score {score:.3f}, {len(regions)} lesion(s)"
    if regions:
        largest = max(regions, key=lambda r: r.longest_diameter_um)
        d_mm = largest.longest_diameter_um / 1000.0
        title += f", largest {d_mm:.2f} mm ({CATEGORY_NAMES[size_category(d_mm)]})"
    title += f", {n_points} candidate(s)"
    if problem:
        title += f"\n{problem}"
    return title
