"""Hard-negative mining between training rounds (Fast ScanNet).

Round ``k``'s model is run densely over every ROI block of the training slides by the inference
stage itself (:func:`wsiscan.infer.infer_slide`: its prefetching block reader and
:func:`wsiscan.dense.dense_tiles`, written to a temporary ``tiles.h5`` per slide). Every map cell
whose tumour probability exceeds ``threshold`` and whose patch centre lies at least
``margin_um`` outside the tumour annotations (all of a normal slide counts) is a false positive;
its patch centre (cell ``(i, j)`` -> level-0 ``(j*Sd + Sd//2, i*Sd + Sd//2)``, the centre of the
patch the map scored) becomes a hard negative. The default margin, 75 um, is the Camelyon16
FROC distance within which a detection still counts as a hit, so a mined cell is one that
evaluation would count as a false positive.

``block_fraction`` < 1 scans a seeded random share of each slide's blocks (a different share in
each round) to bound the cost on a small compute budget; 1 (the default) scans them all, as the
paper does.

Per slide at most ``max_per_slide`` cells are kept, chosen uniformly at random (seeded) over the
slide's false-positive area with bounded memory, then ``max_per_round`` over all slides with
equal per-slide shares. ``hard_negatives.h5`` has the layout of ``samples.h5``
(:mod:`wsiscan.train`) plus ``probability``; its slide table is the samples' table, so the
validation split carries over.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ConfigError
from .faults import h5_attrs
from .geometry import Geometry
from .samples import (
    LABEL_NORMAL,
    MAX_RASTER_SIDE,
    SampleTable,
    border_distance_um,
    raster_downsample,
    read_sample_table,
    stable_rng,
    water_fill,
    write_sample_table,
)

log = logging.getLogger(__name__)

TILE_CHUNK = 64  # tiles read from tiles.h5 at a time


@dataclass(frozen=True)
class MineParams:
    """Hard-negative mining settings (see config ``train.mine``)."""

    threshold: float = 0.5
    margin_um: float = 75.0
    max_per_slide: int = 500
    max_per_round: int = 2000
    raster_mpp: float = 4.0
    block_fraction: float = 1.0
    batch_size: int = 4
    workers: int = 1
    threads: int | None = None
    device: str = "auto"
    amp: bool = False
    dense_mode: str = "single"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"train.mine.threshold must be in [0, 1), got {self.threshold}")
        if self.margin_um < 0:
            raise ConfigError(f"train.mine.margin_um must be >= 0, got {self.margin_um}")
        if self.max_per_slide < 0 or self.max_per_round < 0:
            raise ConfigError("train.mine.max_per_slide and max_per_round must be >= 0")
        if not 0.0 < self.block_fraction <= 1.0:
            raise ConfigError(
                f"train.mine.block_fraction must be in (0, 1], got {self.block_fraction}"
            )


def cells_above(
    tiles: np.ndarray,
    grid_xy: np.ndarray,
    geometry: Geometry,
    threshold: float,
    slide_wh: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Patch centres (level-0, (M, 2) int64) and probabilities of tile cells above ``threshold``.

    ``tiles`` (N, T, T) are dense tiles of blocks ``grid_xy`` (N, 2) ``(bx, by)``: cell ``(r, c)``
    of block ``(bx, by)`` is map cell ``(by*T + r, bx*T + c)`` with centre
    ``((bx*T + c)*Sd + Sd//2, (by*T + r)*Sd + Sd//2)``. Cells whose centre is outside the slide
    are dropped.
    """
    t, sd = geometry.tile_side, geometry.Sd
    n, r, c = np.nonzero(np.asarray(tiles) > threshold)
    x = (grid_xy[n, 0].astype(np.int64) * t + c) * sd + sd // 2
    y = (grid_xy[n, 1].astype(np.int64) * t + r) * sd + sd // 2
    inside = (x < slide_wh[0]) & (y < slide_wh[1])
    xy = np.stack([x[inside], y[inside]], axis=1).astype(np.int64)
    return xy, np.asarray(tiles)[n, r, c][inside].astype(np.float32)


class TumourDistance:
    """Lower bound of the distance (um) from level-0 points to the tumour annotations.

    Built on a raster at ``raster_mpp`` (coarsened to at most ``MAX_RASTER_SIDE`` px); the bound
    subtracts the raster's discretisation, so ``distance_um(p) >= margin`` guarantees the point is
    at least ``margin`` from tumour. Without tumour polygons every distance is infinite.
    """

    def __init__(
        self,
        annotations: Sequence[Any],
        slide_wh: tuple[int, int],
        mpp: float,
        raster_mpp: float,
        reach_um: float,
    ) -> None:
        from .annotations import rasterize

        self.ds = raster_downsample(slide_wh, mpp, raster_mpp, MAX_RASTER_SIDE)
        self.raster_um = self.ds * mpp
        shape = (math.ceil(slide_wh[1] / self.ds), math.ceil(slide_wh[0] / self.ds))
        tumour = rasterize(annotations, shape, self.ds) if annotations else None
        self.outside: np.ndarray | None = None
        if tumour is not None and tumour.any():
            _, outside, win = border_distance_um(tumour, self.raster_um, reach_um)
            # negative on tumour pixels; one more raster pixel off for points inside a pixel
            self.outside = outside - self.raster_um
            self.window = win

    def distance_um(self, level0_xy: np.ndarray) -> np.ndarray:
        """Distance lower bound (um) for ``(M, 2)`` level-0 points; inf far from any tumour."""
        out = np.full(len(level0_xy), np.inf)
        if self.outside is None or not len(level0_xy):
            return out
        r = np.floor(level0_xy[:, 1] / self.ds).astype(np.int64) - self.window[0].start
        c = np.floor(level0_xy[:, 0] / self.ds).astype(np.int64) - self.window[1].start
        h, w = self.outside.shape
        near = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        out[near] = self.outside[r[near], c[near]]
        return out


def block_subset(
    rois_h5: str | Path, out_h5: str | Path, fraction: float, rng: np.random.Generator
) -> Path:
    """``rois_h5`` itself when ``fraction`` is 1, else a copy holding a random ``fraction`` of its
    blocks (at least one), written to ``out_h5`` in the same format."""
    from .grid import GridResult, read_rois, write_rois

    if fraction >= 1.0:
        return Path(rois_h5)
    arrays, attrs = read_rois(rois_h5)
    n = len(arrays["tissue_fraction"])
    k = min(n, max(1, int(round(fraction * n))))
    keep = np.sort(rng.choice(n, size=k, replace=False)) if n else np.zeros(0, np.int64)
    result = GridResult(
        level0_xy=arrays["level0_xy"][keep],
        grid_xy=arrays["grid_xy"][keep],
        tissue_fraction=arrays["tissue_fraction"][keep],
        grid_shape=tuple(attrs["grid_shape"]),
        fraction_map=np.zeros((0, 0), np.float32),
    )
    write_rois(
        out_h5,
        result,
        Geometry.from_attrs(attrs),
        slide_id=str(attrs["slide_id"]),
        slide_wh=(int(attrs["slide_width"]), int(attrs["slide_height"])),
        mpp=float(attrs["mpp"]),
        mask_level=int(attrs["mask_level"]),
        mask_downsample_xy=(float(attrs["mask_downsample_x"]), float(attrs["mask_downsample_y"])),
        min_tissue_fraction=float(attrs["min_tissue_fraction"]),
    )
    return Path(out_h5)


class _Reservoir:
    """Keeps ``k`` items chosen uniformly at random from a stream (smallest random keys)."""

    def __init__(self, k: int, rng: np.random.Generator) -> None:
        self.k, self.rng = k, rng
        self.keys = np.zeros(0)
        self.xy = np.zeros((0, 2), np.int64)
        self.prob = np.zeros(0, np.float32)
        self.seen = 0

    def add(self, xy: np.ndarray, prob: np.ndarray) -> None:
        self.seen += len(xy)
        keys = np.concatenate([self.keys, self.rng.random(len(xy))])
        xy = np.concatenate([self.xy, xy])
        prob = np.concatenate([self.prob, prob])
        if len(keys) > self.k:
            keep = np.argpartition(keys, self.k - 1)[: self.k] if self.k else keys[:0].astype(int)
            keys, xy, prob = keys[keep], xy[keep], prob[keep]
        self.keys, self.xy, self.prob = keys, xy, prob


def false_positive_cells(
    tiles_h5: str | Path,
    tumour: TumourDistance,
    threshold: float,
    margin_um: float,
    slide_wh: tuple[int, int],
    keep: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Read ``tiles.h5`` in chunks; return ``(centres, probabilities, n_false_positive_cells)``
    with at most ``keep`` centres chosen uniformly among the false-positive cells."""
    reservoir = _Reservoir(keep, rng)
    with h5py.File(tiles_h5, "r") as f:
        geometry = Geometry.from_attrs(h5_attrs(f))
        tiles, grid_xy = f["tiles"], f["grid_xy"][()].astype(np.int64)
        for start in range(0, tiles.shape[0], TILE_CHUNK):
            chunk = tiles[start : start + TILE_CHUNK].astype(np.float32)
            xy, prob = cells_above(
                chunk, grid_xy[start : start + TILE_CHUNK], geometry, threshold, slide_wh
            )
            far = tumour.distance_um(xy) >= margin_um
            reservoir.add(xy[far], prob[far])
    order = np.lexsort((reservoir.xy[:, 0], reservoir.xy[:, 1])) if len(reservoir.xy) else []
    return reservoir.xy[order], reservoir.prob[order], reservoir.seen


def mine_negatives(
    samples_h5: str | Path,
    model_path: str | Path,
    rois_files: Sequence[str | Path],
    out_h5: str | Path,
    params: MineParams | None = None,
    *,
    round_index: int = 1,
    mpp_fallback: float | None = None,
) -> dict[str, Any]:
    """Mine the false positives of ``model_path`` on the slides of ``samples_h5``.

    ``rois_files`` are the slides' ``rois.h5`` (matched by their ``slide_id`` attribute; every
    slide of the sample table needs one). Writes ``hard_negatives.h5`` and returns a summary
    with the false-positive cell count of every slide.
    """
    from .annotations import read_asap_xml, split_groups
    from .grid import read_rois
    from .infer import infer_slide
    from .model import file_checksum
    from .slide import open_slide

    params = params or MineParams()
    t0 = time.perf_counter()
    table = read_sample_table(samples_h5)
    rois_by_id: dict[str, Path] = {}
    for path in rois_files:
        _, attrs = read_rois(path)
        rois_by_id[str(attrs["slide_id"])] = Path(path)
    missing = [s for s in table.slide_id if s not in rois_by_id]
    if missing:
        raise ConfigError(f"mine_negatives: no rois.h5 given for training slide(s) {missing}")

    out_h5 = Path(out_h5)
    out_h5.parent.mkdir(parents=True, exist_ok=True)
    per_slide: list[dict[str, Any]] = []
    found: list[tuple[np.ndarray, np.ndarray]] = []
    geometry_attrs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=".mining-", dir=out_h5.parent) as tmp:
        for i, sid in enumerate(table.slide_id):
            t_slide = time.perf_counter()
            tiles_h5 = Path(tmp) / f"{sid}.tiles.h5"
            rois = block_subset(
                rois_by_id[sid],
                Path(tmp) / f"{sid}.rois.h5",
                params.block_fraction,
                stable_rng(params.seed, round_index, "mine-blocks", sid),
            )
            infer_slide(
                table.slide_path[i],
                rois,
                model_path,
                tiles_h5,
                slide_id=sid,
                batch_size=params.batch_size,
                num_workers=params.workers,
                device=params.device,
                amp=params.amp,
                tile_dtype="float32",
                dense_mode=params.dense_mode,
                mpp_fallback=mpp_fallback,
                threads=params.threads,
            )
            with open_slide(table.slide_path[i], sid, mpp_fallback) as slide:
                slide_wh, mpp = slide.dimensions, slide.mpp
            annotation = table.slide_annotation[i]
            tumour_polys: list[Any] = []
            if annotation:
                anns = read_asap_xml(annotation, sid)
                if split_groups(anns)[0]:
                    tumour_polys = anns
            tumour = TumourDistance(
                tumour_polys, slide_wh, mpp, params.raster_mpp, params.margin_um
            )
            xy, prob, n_fp = false_positive_cells(
                tiles_h5,
                tumour,
                params.threshold,
                params.margin_um,
                slide_wh,
                params.max_per_slide,
                stable_rng(params.seed, round_index, "mine", sid),
            )
            with h5py.File(tiles_h5, "r") as f:
                n_blocks = int(f["tiles"].shape[0])
                if not geometry_attrs:
                    geometry_attrs = Geometry.from_attrs(h5_attrs(f)).as_attrs()
                sd = int(f.attrs["Sd"])
            tiles_h5.unlink()
            found.append((xy, prob))
            record = {
                "slide_id": sid,
                "label": table.slide_label[i],
                "validation": bool(table.slide_is_val[i]),
                "blocks": n_blocks,
                "false_positive_cells": int(n_fp),
                "false_positive_area_mm2": n_fp * (sd * mpp / 1000.0) ** 2,
                "candidates_kept": int(len(xy)),
                "seconds": round(time.perf_counter() - t_slide, 2),
            }
            per_slide.append(record)
            log.info(
                "%s (%s): %d blocks, %d cells above %.2f outside tumour (%.3f mm2), kept %d",
                sid,
                table.slide_label[i],
                n_blocks,
                n_fp,
                params.threshold,
                record["false_positive_area_mm2"],
                len(xy),
            )

    alloc = water_fill(params.max_per_round, [len(xy) for xy, _ in found])
    xy_parts, prob_parts, idx_parts = [], [], []
    for i, ((xy, prob), k) in enumerate(zip(found, alloc, strict=True)):
        if k < len(xy):
            rng = stable_rng(params.seed, round_index, "mine-cap", table.slide_id[i])
            pick = np.sort(rng.choice(len(xy), size=int(k), replace=False))
            xy, prob = xy[pick], prob[pick]
        per_slide[i]["hard_negatives"] = int(len(xy))
        xy_parts.append(xy)
        prob_parts.append(prob)
        idx_parts.append(np.full(len(xy), i, np.int32))
    n = int(sum(len(x) for x in xy_parts))
    out = SampleTable(
        slide_id=list(table.slide_id),
        slide_path=list(table.slide_path),
        slide_label=list(table.slide_label),
        slide_is_val=table.slide_is_val.copy(),
        slide_annotation=list(table.slide_annotation),
        level0_xy=np.concatenate(xy_parts).reshape(-1, 2) if n else np.zeros((0, 2), np.int64),
        label=np.full(n, LABEL_NORMAL, np.uint8),
        slide_index=np.concatenate(idx_parts) if n else np.zeros(0, np.int32),
        probability=np.concatenate(prob_parts) if n else np.zeros(0, np.float32),
    )
    attrs = {
        "kind": "hard_negatives",
        "round": int(round_index),
        "model_sha256": file_checksum(model_path),
        "samples": str(samples_h5),
        "Lf": table.attrs.get("Lf", 0),
        "Sf": table.attrs.get("Sf", 0),
        **{f"geometry_{k}": v for k, v in geometry_attrs.items()},
        **{k: v for k, v in asdict(params).items() if k not in ("workers", "threads", "device")},
    }
    normal = [r["false_positive_cells"] for r in per_slide if r["label"] == "normal"]
    summary = {
        "path": str(out_h5),
        "round": int(round_index),
        "hard_negatives": n,
        "false_positive_cells": int(sum(r["false_positive_cells"] for r in per_slide)),
        "false_positive_cells_per_normal_slide": float(np.mean(normal)) if normal else None,
        "slides": per_slide,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    attrs["summary_json"] = json.dumps(summary)
    write_sample_table(out_h5, out, attrs)
    log.info(
        "round %d: %d hard negatives from %d false-positive cells on %d slides in %.1f s",
        round_index,
        n,
        summary["false_positive_cells"],
        len(per_slide),
        summary["seconds"],
    )
    if not n:
        log.warning(
            "round %d: no false positives above %.2f: no hard negatives",
            round_index,
            params.threshold,
        )
    return summary
