"""Training patches (stage ``train_patches``): the base patch centres of the training slides.

Positives lie inside the tumour annotations (ASAP XML or QuPath GeoJSON; groups
``annotation.tumour_groups`` minus ``annotation.exclusion_groups``, by default Camelyon16's
``Tumor``/``_0``/``_1`` minus ``_2``; a tumour slide without a tumour polygon is an error) at
least ``positive_margin_um`` from the tumour border; negatives lie in tissue at least
``negative_margin_um`` away from any tumour, on tumour and normal slides alike. Candidates are the
centres of a raster laid over the slide at ``raster_mpp`` um/px (capped so the raster stays small
on gigapixel slides); each slide gets an equal share of the positives (tumour slides) and of the
negatives (all slides), water-filled when a slide has fewer candidates than its share; centres
are drawn without replacement. A slide-level validation split (stratified by label) is stored
with the patches so every round validates on the same held-out slides. Deterministic from the
seed (per-slide generators seeded from the seed and a hash of the slide ID).

The patch tables are :mod:`wsiscan.formats.patches`. No torch here: the stage and the command
line start without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .errors import ConfigError
from .formats.patches import LABEL_NORMAL, LABEL_TUMOUR, PatchTable, write_patch_table
from .formats.tissue_mask import check_mask_fits, read_tissue_mask
from .geometry import ARCHITECTURES, receptive_field
from .params import TrainPatchesParams
from .slide import check_slide_id, open_slide

log = logging.getLogger(__name__)

SLIDE_LABELS = ("tumor", "normal")
MAX_RASTER_SIDE = 8192


@dataclass(frozen=True)
class TrainSlide:
    """One training slide: ID, slide file, label (tumor|normal), annotation (XML or GeoJSON),
    tissue mask PNG."""

    slide_id: str
    path: str
    label: str
    mask: str
    annotation: str | None = None

    def __post_init__(self) -> None:
        check_slide_id(self.slide_id)
        if self.label not in SLIDE_LABELS:
            raise ConfigError(
                f"slide {self.slide_id!r}: training label must be one of {SLIDE_LABELS}, "
                f"got {self.label!r}"
            )


def stable_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A numpy Generator seeded from ``seed`` and keys (strings hashed with SHA-256, not hash())."""
    entropy = [int(seed) & 0xFFFFFFFF]
    for key in keys:
        if isinstance(key, str):
            entropy.append(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        else:
            entropy.append(int(key) & 0xFFFFFFFFFFFFFFFF)
    return np.random.default_rng(np.random.SeedSequence(entropy))


def raster_downsample(
    slide_wh: tuple[int, int], mpp: float, raster_mpp: float, max_side: int = MAX_RASTER_SIDE
) -> float:
    """Level-0 px per raster px: ``raster_mpp / mpp``, coarsened so no raster side > ``max_side``."""
    ds = raster_mpp / mpp
    return max(ds, max(slide_wh) / max_side, 1.0)


def raster_centres_level0(
    rows: np.ndarray, cols: np.ndarray, downsample: float
) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 ``(x, y)`` (int64) of raster pixel centres ``(rows, cols)`` at ``downsample``."""
    x = np.floor((cols + 0.5) * downsample).astype(np.int64)
    y = np.floor((rows + 0.5) * downsample).astype(np.int64)
    return x, y


def tissue_on_raster(
    mask: np.ndarray, mask_downsample_xy: tuple[float, float], shape_hw: tuple[int, int], ds: float
) -> np.ndarray:
    """The tissue mask sampled at the raster's pixel centres (bool ``shape_hw``)."""
    rows = np.arange(shape_hw[0])
    cols = np.arange(shape_hw[1])
    x, _ = raster_centres_level0(np.zeros_like(cols), cols, ds)
    _, y = raster_centres_level0(rows, np.zeros_like(rows), ds)
    h, w = mask.shape
    c = np.clip(np.floor(x / mask_downsample_xy[0]).astype(np.int64), 0, w - 1)
    r = np.clip(np.floor(y / mask_downsample_xy[1]).astype(np.int64), 0, h - 1)
    return mask[np.ix_(r, c)]


def border_distance_um(
    tumour: np.ndarray, raster_um: float, reach_um: float
) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice]]:
    """Conservative distances to the tumour border, computed on the tumour's bounding box.

    Returns ``(inside_um, outside_um, window)``: for raster pixels in ``window`` (the tumour's
    bounding box grown by ``reach_um``), the distance of each tumour pixel's centre to the border
    (``inside_um``) and of each other pixel's centre to the nearest tumour (``outside_um``), both
    lower bounds (the Euclidean distance transform minus one pixel). Outside the raster counts as
    non-tumour, so tumour touching the raster edge has a border there.
    """
    rows = np.flatnonzero(tumour.any(axis=1))
    cols = np.flatnonzero(tumour.any(axis=0))
    pad = int(math.ceil(reach_um / raster_um)) + 2
    r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, tumour.shape[0])
    c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, tumour.shape[1])
    sub = np.pad(tumour[r0:r1, c0:c1], 1, constant_values=False)
    inside = (ndi.distance_transform_edt(sub)[1:-1, 1:-1] - 1.0) * raster_um
    outside = (ndi.distance_transform_edt(~sub)[1:-1, 1:-1] - 1.0) * raster_um
    return inside, outside, (slice(r0, r1), slice(c0, c1))


def candidate_masks(
    tumour: np.ndarray,
    tissue: np.ndarray,
    raster_um: float,
    positive_margin_um: float,
    negative_margin_um: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Raster pixels eligible as positive and as negative patch centres (bool, same shape).

    Positive: tumour, in tissue, at least ``positive_margin_um`` inside the tumour border.
    Negative: tissue, not tumour, at least ``negative_margin_um`` from any tumour.
    """
    pos = tumour & tissue
    neg = tissue & ~tumour
    if tumour.any():
        inside, outside, win = border_distance_um(
            tumour, raster_um, max(positive_margin_um, negative_margin_um)
        )
        pos[win] &= inside >= positive_margin_um
        neg[win] &= outside >= negative_margin_um
    return pos, neg


def water_fill(total: int, capacity: Sequence[int]) -> np.ndarray:
    """Split ``total`` into equal shares capped by ``capacity``; what a full slot cannot take goes
    to the others. Returns int64 counts (sum = min(total, sum(capacity)))."""
    cap = np.asarray(capacity, dtype=np.int64)
    out = np.zeros(len(cap), dtype=np.int64)
    remaining = int(total)
    order = np.argsort(cap, kind="stable")
    for k, i in enumerate(order):
        share = remaining // (len(cap) - k)
        out[i] = min(int(cap[i]), share)
        remaining -= int(out[i])
    if remaining > 0:  # rounding left-overs: one more to slots with room, largest first
        for i in order[::-1]:
            if remaining == 0:
                break
            extra = min(int(cap[i] - out[i]), remaining)
            out[i] += extra
            remaining -= extra
    return out


def split_validation_slides(
    slide_ids: Sequence[str], labels: Sequence[str], val_fraction: float, seed: int
) -> np.ndarray:
    """Bool per slide: held out for validation. Stratified by label: ``round(fraction * n)``
    slides of each label, at least one when the fraction is > 0 and a label has two or more
    slides, never every slide of a label."""
    is_val = np.zeros(len(slide_ids), dtype=bool)
    if val_fraction <= 0:
        return is_val
    for lab in SLIDE_LABELS:
        idx = [i for i, lb in enumerate(labels) if lb == lab]
        if len(idx) < 2:
            continue
        k = min(max(1, int(round(val_fraction * len(idx)))), len(idx) - 1)
        idx.sort(key=lambda i: slide_ids[i])
        rng = stable_rng(seed, "validation", lab)
        is_val[rng.choice(idx, size=k, replace=False)] = True
    return is_val


@dataclass
class SlideRaster:
    """A training slide on the candidate raster: level-0 px per raster px, raster spacing in um,
    and the candidate centres of positives and negatives."""

    ds: float
    raster_um: float
    pos: np.ndarray
    neg: np.ndarray
    slide_wh: tuple[int, int]
    mpp: float


def slide_raster(slide: TrainSlide, params: TrainPatchesParams) -> SlideRaster:
    """The candidate rasters of one training slide (from its tissue mask and annotation)."""
    from .annotations import AnnotationGroups, rasterize, read_slide_annotations, split_groups

    groups = AnnotationGroups.of(params)
    mask, meta = read_tissue_mask(slide.mask, slide.slide_id)
    with open_slide(slide.path, slide.slide_id) as s:
        w, h = s.dimensions
    check_mask_fits(meta, (w, h), slide.slide_id, slide.mask)
    mpp = float(meta["slide_mpp"])
    ds = raster_downsample((w, h), mpp, params.raster_mpp, MAX_RASTER_SIDE)
    shape = (math.ceil(h / ds), math.ceil(w / ds))
    annotations = []
    if slide.annotation:
        annotations = read_slide_annotations(
            slide.annotation,
            (w, h),
            slide_id=slide.slide_id,
            groups=groups,
            tumour_slide=slide.label == "tumor",
        )
    tumour_polys, _ = split_groups(annotations, groups)
    if slide.label == "normal" and tumour_polys:
        log.warning(
            "%s: normal slide with %d tumour polygon(s): they are kept out of the negatives",
            slide.slide_id,
            len(tumour_polys),
        )
    tumour = rasterize(annotations, shape, ds, groups)
    tissue = tissue_on_raster(mask, (meta["downsample_x"], meta["downsample_y"]), shape, ds)
    raster_um = ds * mpp
    pos, neg = candidate_masks(
        tumour, tissue, raster_um, params.positive_margin_um, params.negative_margin_um
    )
    if slide.label == "normal":
        pos[:] = False
    return SlideRaster(ds=ds, raster_um=raster_um, pos=pos, neg=neg, slide_wh=(w, h), mpp=mpp)


def _draw(candidates: np.ndarray, k: int, ds: float, rng: np.random.Generator) -> np.ndarray:
    """``k`` raster pixels of ``candidates`` without replacement, as level-0 centres (k, 2)."""
    flat = np.flatnonzero(candidates)
    pick = np.sort(rng.choice(flat, size=k, replace=False)) if k else flat[:0]
    rows, cols = np.divmod(pick, candidates.shape[1])
    x, y = raster_centres_level0(rows, cols, ds)
    return np.stack([x, y], axis=1).astype(np.int64)


def training_slides(
    sheet: str | Path, masks: Sequence[str | Path], base_dir: str | Path = "."
) -> list[TrainSlide]:
    """The training slides of ``sheet`` (split ``train``, label tumor or normal, in sheet order)
    with their tissue masks, matched by the masks' ``slide_id``. A slide without a mask is a
    :class:`ConfigError`."""
    from .config import load_samples

    samples = load_samples(sheet, base_dir=base_dir, check_files=False)
    rows = samples[(samples["split"] == "train") & samples["label"].isin(SLIDE_LABELS)]
    by_id: dict[str, str] = {}
    for mask in masks:
        _, meta = read_tissue_mask(mask)
        by_id[str(meta["slide_id"])] = str(mask)
    missing = [sid for sid in rows.index if sid not in by_id]
    if missing:
        raise ConfigError(f"train_patches: no tissue mask given for training slide(s) {missing}")
    base = Path(base_dir)
    return [
        TrainSlide(
            slide_id=sid,
            path=str(base / row["path"]),
            label=row["label"],
            mask=by_id[sid],
            annotation=str(base / row["annotation"]) if row["annotation"] else None,
        )
        for sid, row in rows.iterrows()
    ]


def draw_patches(
    slides: Sequence[TrainSlide], params: TrainPatchesParams
) -> tuple[PatchTable, list]:
    """Draw the base patch centres of ``slides``: candidate counts (pass 1), equal water-filled
    shares, draws (pass 2) and the validation split. Returns the table and per-slide counts."""
    n_pos_total = int(round(params.n_patches * params.positive_fraction))
    n_neg_total = params.n_patches - n_pos_total

    # pass 1: candidate counts per slide (rasters are cheap to recompute, not kept in memory)
    counts = np.zeros((len(slides), 2), dtype=np.int64)
    for i, slide in enumerate(slides):
        raster = slide_raster(slide, params)
        counts[i] = int(raster.pos.sum()), int(raster.neg.sum())
        log.info(
            "%s (%s): %d positive / %d negative candidate centres at %.2f um spacing",
            slide.slide_id,
            slide.label,
            counts[i, 0],
            counts[i, 1],
            raster.raster_um,
        )
    if counts[:, 0].sum() == 0:
        raise ConfigError(
            "train_patches: no positive patch centres: training needs tumour slides with tumour "
            f"annotations in tissue (positive margin {params.positive_margin_um} um)"
        )
    n_pos = water_fill(n_pos_total, counts[:, 0])
    n_neg = water_fill(n_neg_total, counts[:, 1])
    if n_pos.sum() < n_pos_total or n_neg.sum() < n_neg_total:
        log.warning(
            "only %d positive / %d negative centres available (asked %d / %d)",
            n_pos.sum(),
            n_neg.sum(),
            n_pos_total,
            n_neg_total,
        )

    # pass 2: draw ("samples" keys the generators, as it did before the stage was renamed)
    xy_parts, label_parts, index_parts, mpps = [], [], [], []
    per_slide = []
    for i, slide in enumerate(slides):
        raster = slide_raster(slide, params)
        rng = stable_rng(params.seed, "samples", slide.slide_id)
        pos_xy = _draw(raster.pos, int(n_pos[i]), raster.ds, rng)
        neg_xy = _draw(raster.neg, int(n_neg[i]), raster.ds, rng)
        xy_parts += [pos_xy, neg_xy]
        label_parts += [
            np.full(len(pos_xy), LABEL_TUMOUR, np.uint8),
            np.full(len(neg_xy), LABEL_NORMAL, np.uint8),
        ]
        index_parts.append(np.full(len(pos_xy) + len(neg_xy), i, np.int32))
        mpps.append(raster.mpp)
        per_slide.append(
            {
                "slide_id": slide.slide_id,
                "label": slide.label,
                "positives": int(len(pos_xy)),
                "negatives": int(len(neg_xy)),
                "width": raster.slide_wh[0],
                "height": raster.slide_wh[1],
                "mpp": raster.mpp,
            }
        )
    ids = [s.slide_id for s in slides]
    is_val = split_validation_slides(
        ids, [s.label for s in slides], params.val_fraction, params.seed
    )
    table = PatchTable(
        slide_id=ids,
        slide_path=[str(s.path) for s in slides],
        slide_label=[s.label for s in slides],
        slide_is_val=is_val,
        slide_annotation=[s.annotation or "" for s in slides],
        slide_mpp=np.asarray(mpps, dtype=np.float64),
        level0_xy=np.concatenate(xy_parts).reshape(-1, 2).astype(np.int64),
        label=np.concatenate(label_parts).astype(np.uint8),
        slide_index=np.concatenate(index_parts).astype(np.int32),
    )
    return table, per_slide


def train_patches(
    sheet: str | Path,
    masks: Sequence[str | Path],
    out_patches: str | Path,
    params: TrainPatchesParams,
    *,
    base_dir: str | Path = ".",
) -> dict[str, Any]:
    """Stage ``train_patches``: the base patch centres of the training slides of ``sheet``
    (``masks``: their ``tissue.png``) -> ``patches.h5``.

    Returns a summary (counts per slide and label, validation slides). Raises
    :class:`ConfigError` when there are no training slides or no positive candidates at all.
    """
    slides = training_slides(sheet, masks, base_dir)
    if not slides:
        raise ConfigError("train_patches: no training slides (split train, label tumor|normal)")
    table, per_slide = draw_patches(slides, params)
    lf, sf = receptive_field(ARCHITECTURES[params.arch]())
    attrs = {"kind": "patches", "Lf": lf, "Sf": sf, **dataclasses.asdict(params)}
    write_patch_table(out_patches, table, attrs)
    summary = {
        "path": str(out_patches),
        "n": len(table),
        "positives": int(table.label.sum()),
        "negatives": int(len(table) - table.label.sum()),
        "val_slides": [s for s, v in zip(table.slide_id, table.slide_is_val, strict=True) if v],
        "slides": per_slide,
    }
    log.info(
        "wrote %s: %d centres (%d positive, %d negative) from %d slides; validation slides %s",
        out_patches,
        summary["n"],
        summary["positives"],
        summary["negatives"],
        len(slides),
        summary["val_slides"],
    )
    return summary
