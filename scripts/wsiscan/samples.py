"""Training samples (stage ``train_samples``) and the sample tables every training stage reads.

* **Samples**: level-0 patch *centres* on the training slides. Positives lie inside the tumour
  annotations (``Tumor``/``_0``/``_1`` minus ``_2`` exclusions) at least ``positive_margin_um``
  from the tumour border; negatives lie in tissue at least ``negative_margin_um`` away from any
  tumour, on tumour and normal slides alike. Candidates are the centres of a raster laid over the
  slide at ``raster_mpp`` um/px (capped so the raster stays small on gigapixel slides); each slide
  gets an equal share of the positives (tumour slides) and of the negatives (all slides),
  water-filled when a slide has fewer candidates than its share; centres are drawn without
  replacement. A slide-level validation split (stratified by label) is stored with the samples so
  every round validates on the same held-out slides. Deterministic from the seed (per-slide
  generators seeded from the seed and a hash of the slide ID).
* **Sample tables** (``samples.h5``, ``hard_negatives.h5``): datasets ``level0_xy`` (N, 2) int64
  patch centres, ``label`` (N,) uint8 (1 tumour, 0 normal), ``slide_index`` (N,) int32 into the
  slide table ``slide_id``/``slide_path``/``slide_label``/``slide_is_val``; hard negatives also
  ``probability`` (N,) float32; attributes ``Lf``, ``Sf``, ``arch``, ``seed`` and the parameters.

No torch here: the stage and the command line start without it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy import ndimage as ndi

from . import __version__
from .errors import ConfigError, SlideError
from .faults import h5_attrs
from .geometry import ARCHITECTURES, receptive_field
from .slide import check_slide_id, open_slide
from .tissue import atomic_path

log = logging.getLogger(__name__)

LABEL_TUMOUR = 1
LABEL_NORMAL = 0
SLIDE_LABELS = ("tumor", "normal")
SAMPLES_FORMAT = "wsiscan-samples/1"
MAX_RASTER_SIDE = 8192


@dataclass(frozen=True)
class TrainSlide:
    """One training slide: ID, slide file, label (tumor|normal), annotation XML, tissue mask PNG."""

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


@dataclass(frozen=True)
class SampleParams:
    """How ``train_samples`` draws patch centres (sizes in um, counts over all slides)."""

    n_samples: int = 4000
    positive_fraction: float = 0.5
    positive_margin_um: float = 20.0
    negative_margin_um: float = 50.0
    raster_mpp: float = 4.0
    val_fraction: float = 0.2
    seed: int = 0
    max_raster_side: int = MAX_RASTER_SIDE

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ConfigError(f"train.samples must be >= 1, got {self.n_samples}")
        if not 0.0 < self.positive_fraction < 1.0:
            raise ConfigError(
                f"train.positive_fraction must be in (0, 1), got {self.positive_fraction}"
            )
        if self.positive_margin_um < 0 or self.negative_margin_um < 0:
            raise ConfigError("train.positive_margin_um and negative_margin_um must be >= 0")
        if self.raster_mpp <= 0:
            raise ConfigError(f"train.raster_mpp must be > 0, got {self.raster_mpp}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"train.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class SampleTable:
    """Patch centres with labels and their slide table (the content of samples.h5)."""

    slide_id: list[str]
    slide_path: list[str]
    slide_label: list[str]
    slide_is_val: np.ndarray  # (S,) bool
    slide_annotation: list[str]  # annotation XML per slide, "" for none
    level0_xy: np.ndarray  # (N, 2) int64 x, y patch centres
    label: np.ndarray  # (N,) uint8
    slide_index: np.ndarray  # (N,) int32
    probability: np.ndarray | None = None  # (N,) float32, hard negatives only
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def is_val(self) -> np.ndarray:
        """(N,) bool: the sample lies on a validation slide."""
        return self.slide_is_val[self.slide_index] if len(self) else np.zeros(0, bool)


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
class _SlideRaster:
    ds: float
    raster_um: float
    pos: np.ndarray
    neg: np.ndarray


def _slide_raster(slide: TrainSlide, params: SampleParams, mpp_fallback: float | None):
    from .annotations import rasterize, read_asap_xml, split_groups
    from .tissue import read_tissue_mask

    with open_slide(slide.path, slide.slide_id, mpp_fallback) as s:
        w, h = s.dimensions
        mpp = s.mpp
    mask, meta = read_tissue_mask(slide.mask, slide.slide_id)
    if (meta["slide_width"], meta["slide_height"]) != (w, h):
        raise SlideError(
            slide.slide_id,
            slide.mask,
            f"tissue mask was made for a {meta['slide_width']}x{meta['slide_height']} slide, "
            f"the slide is {w}x{h}",
        )
    ds = raster_downsample((w, h), mpp, params.raster_mpp, params.max_raster_side)
    shape = (math.ceil(h / ds), math.ceil(w / ds))
    annotations = read_asap_xml(slide.annotation, slide.slide_id) if slide.annotation else []
    tumour_polys, _ = split_groups(annotations)
    if slide.label == "tumor" and not tumour_polys:
        log.warning("%s: tumour slide without tumour polygons: negatives only", slide.slide_id)
    if slide.label == "normal" and tumour_polys:
        log.warning(
            "%s: normal slide with %d tumour polygon(s): they are kept out of the negatives",
            slide.slide_id,
            len(tumour_polys),
        )
    tumour = rasterize(annotations, shape, ds)
    tissue = tissue_on_raster(mask, (meta["downsample_x"], meta["downsample_y"]), shape, ds)
    raster_um = ds * mpp
    pos, neg = candidate_masks(
        tumour, tissue, raster_um, params.positive_margin_um, params.negative_margin_um
    )
    if slide.label == "normal":
        pos[:] = False
    return _SlideRaster(ds=ds, raster_um=raster_um, pos=pos, neg=neg), (w, h), mpp


def _draw(candidates: np.ndarray, k: int, ds: float, rng: np.random.Generator) -> np.ndarray:
    """``k`` raster pixels of ``candidates`` without replacement, as level-0 centres (k, 2)."""
    flat = np.flatnonzero(candidates)
    pick = np.sort(rng.choice(flat, size=k, replace=False)) if k else flat[:0]
    rows, cols = np.divmod(pick, candidates.shape[1])
    x, y = raster_centres_level0(rows, cols, ds)
    return np.stack([x, y], axis=1).astype(np.int64)


def generate_samples(
    slides: Sequence[TrainSlide],
    out_h5: str | Path,
    params: SampleParams | None = None,
    *,
    arch: str = "vgg16",
    mpp_fallback: float | None = None,
) -> dict[str, Any]:
    """Draw the base patch centres of all training ``slides`` and write ``samples.h5``.

    Returns a summary (counts per slide and label, validation slides). Raises
    :class:`ConfigError` when there are no slides or no positive candidates at all.
    """
    params = params or SampleParams()
    if not slides:
        raise ConfigError("train_samples: no training slides (split == train, label tumor|normal)")
    ids = [s.slide_id for s in slides]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"train_samples: duplicate slide IDs in {ids}")
    lf, sf = receptive_field(ARCHITECTURES[arch]())
    n_pos_total = int(round(params.n_samples * params.positive_fraction))
    n_neg_total = params.n_samples - n_pos_total

    # pass 1: candidate counts per slide (rasters are cheap to recompute, not kept in memory)
    counts = np.zeros((len(slides), 2), dtype=np.int64)
    for i, slide in enumerate(slides):
        raster, _, _ = _slide_raster(slide, params, mpp_fallback)
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
            "train_samples: no positive patch centres: training needs tumour slides with tumour "
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

    # pass 2: draw
    xy_parts, label_parts, index_parts = [], [], []
    per_slide = []
    for i, slide in enumerate(slides):
        raster, wh, mpp = _slide_raster(slide, params, mpp_fallback)
        rng = stable_rng(params.seed, "samples", slide.slide_id)
        pos_xy = _draw(raster.pos, int(n_pos[i]), raster.ds, rng)
        neg_xy = _draw(raster.neg, int(n_neg[i]), raster.ds, rng)
        xy_parts += [pos_xy, neg_xy]
        label_parts += [
            np.full(len(pos_xy), LABEL_TUMOUR, np.uint8),
            np.full(len(neg_xy), LABEL_NORMAL, np.uint8),
        ]
        index_parts.append(np.full(len(pos_xy) + len(neg_xy), i, np.int32))
        per_slide.append(
            {
                "slide_id": slide.slide_id,
                "label": slide.label,
                "positives": int(len(pos_xy)),
                "negatives": int(len(neg_xy)),
                "width": wh[0],
                "height": wh[1],
                "mpp": mpp,
            }
        )
    is_val = split_validation_slides(
        ids, [s.label for s in slides], params.val_fraction, params.seed
    )
    table = SampleTable(
        slide_id=ids,
        slide_path=[str(s.path) for s in slides],
        slide_label=[s.label for s in slides],
        slide_is_val=is_val,
        slide_annotation=[s.annotation or "" for s in slides],
        level0_xy=np.concatenate(xy_parts).reshape(-1, 2).astype(np.int64),
        label=np.concatenate(label_parts).astype(np.uint8),
        slide_index=np.concatenate(index_parts).astype(np.int32),
    )
    attrs = {
        "kind": "samples",
        "arch": arch,
        "Lf": lf,
        "Sf": sf,
        **{k: v for k, v in asdict(params).items()},
    }
    write_sample_table(out_h5, table, attrs)
    summary = {
        "path": str(out_h5),
        "n": len(table),
        "positives": int(table.label.sum()),
        "negatives": int(len(table) - table.label.sum()),
        "val_slides": [s for s, v in zip(ids, is_val, strict=True) if v],
        "slides": per_slide,
    }
    log.info(
        "wrote %s: %d centres (%d positive, %d negative) from %d slides; validation slides %s",
        out_h5,
        summary["n"],
        summary["positives"],
        summary["negatives"],
        len(slides),
        summary["val_slides"],
    )
    return summary


def write_sample_table(path: str | Path, table: SampleTable, attrs: dict[str, Any]) -> None:
    """Write a :class:`SampleTable` to HDF5 atomically (``<path>.tmp`` then rename)."""
    n = len(table)
    for name, arr, shape in (
        ("level0_xy", table.level0_xy, (n, 2)),
        ("slide_index", table.slide_index, (n,)),
    ):
        if arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    if n and (table.slide_index.min() < 0 or table.slide_index.max() >= len(table.slide_id)):
        raise ValueError("slide_index outside the slide table")
    text = h5py.string_dtype()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("level0_xy", data=table.level0_xy.astype(np.int64))
        f.create_dataset("label", data=table.label.astype(np.uint8))
        f.create_dataset("slide_index", data=table.slide_index.astype(np.int32))
        if table.probability is not None:
            f.create_dataset("probability", data=table.probability.astype(np.float32))
        f.create_dataset("slide_id", data=np.array(table.slide_id, dtype=object), dtype=text)
        f.create_dataset("slide_path", data=np.array(table.slide_path, dtype=object), dtype=text)
        f.create_dataset("slide_label", data=np.array(table.slide_label, dtype=object), dtype=text)
        f.create_dataset("slide_is_val", data=np.asarray(table.slide_is_val, dtype=bool))
        f.create_dataset(
            "slide_annotation", data=np.array(table.slide_annotation, dtype=object), dtype=text
        )
        f.attrs.update(
            {
                "format": SAMPLES_FORMAT,
                "wsiscan_version": __version__,
                **{k: ("" if v is None else v) for k, v in attrs.items()},
            }
        )


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in dataset[()]]


def read_sample_table(path: str | Path) -> SampleTable:
    """Read ``samples.h5`` / ``hard_negatives.h5``; :class:`SlideError` naming the file if bad."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(None, path, "sample table not found")
    try:
        with h5py.File(path, "r") as f:
            attrs = h5_attrs(f)
            if attrs.get("format") != SAMPLES_FORMAT:
                raise SlideError(
                    None, path, f"not a wsiscan sample table (format {attrs.get('format')!r})"
                )
            table = SampleTable(
                slide_id=_strings(f["slide_id"]),
                slide_path=_strings(f["slide_path"]),
                slide_label=_strings(f["slide_label"]),
                slide_is_val=f["slide_is_val"][()].astype(bool),
                slide_annotation=_strings(f["slide_annotation"]),
                level0_xy=f["level0_xy"][()].astype(np.int64).reshape(-1, 2),
                label=f["label"][()].astype(np.uint8),
                slide_index=f["slide_index"][()].astype(np.int32),
                probability=f["probability"][()].astype(np.float32) if "probability" in f else None,
                attrs=attrs,
            )
    except (OSError, KeyError) as exc:
        raise SlideError(None, path, f"sample table is not readable: {exc}")
    n = len(table)
    if table.level0_xy.shape != (n, 2) or table.slide_index.shape != (n,):
        raise SlideError(None, path, "sample table datasets have inconsistent lengths")
    if n and (table.slide_index.min() < 0 or table.slide_index.max() >= len(table.slide_id)):
        raise SlideError(None, path, "slide_index points outside the slide table")
    return table


def merge_tables(base: SampleTable, extra: Sequence[SampleTable]) -> tuple[SampleTable, np.ndarray]:
    """Base samples plus hard-negative tables, slides matched by ID.

    Returns ``(merged table, source)`` where ``source[i]`` is 0 for base samples and ``k`` for
    samples of ``extra[k-1]``. Slides only in an extra table are appended as training slides.
    """
    ids = list(base.slide_id)
    paths, labels = list(base.slide_path), list(base.slide_label)
    annotations = list(base.slide_annotation)
    is_val = list(base.slide_is_val.astype(bool))
    pos = {s: i for i, s in enumerate(ids)}
    xy, lab, idx, prob, src = [base.level0_xy], [base.label], [base.slide_index], [], []
    prob.append(np.full(len(base), np.nan, np.float32))
    src.append(np.zeros(len(base), np.int32))
    for k, table in enumerate(extra, start=1):
        remap = np.zeros(len(table.slide_id), dtype=np.int32)
        for j, sid in enumerate(table.slide_id):
            if sid not in pos:
                pos[sid] = len(ids)
                ids.append(sid)
                paths.append(table.slide_path[j])
                labels.append(table.slide_label[j])
                annotations.append(table.slide_annotation[j])
                is_val.append(bool(table.slide_is_val[j]))
            remap[j] = pos[sid]
        xy.append(table.level0_xy)
        lab.append(table.label)
        idx.append(remap[table.slide_index] if len(table) else table.slide_index)
        prob.append(
            table.probability
            if table.probability is not None
            else np.full(len(table), np.nan, np.float32)
        )
        src.append(np.full(len(table), k, np.int32))
    merged = SampleTable(
        slide_id=ids,
        slide_path=paths,
        slide_label=labels,
        slide_is_val=np.array(is_val, dtype=bool),
        slide_annotation=annotations,
        level0_xy=np.concatenate(xy).reshape(-1, 2).astype(np.int64),
        label=np.concatenate(lab).astype(np.uint8),
        slide_index=np.concatenate(idx).astype(np.int32),
        probability=np.concatenate(prob).astype(np.float32),
        attrs=dict(base.attrs),
    )
    return merged, np.concatenate(src)
