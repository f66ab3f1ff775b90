"""Hard-negative mining between training rounds (Fast ScanNet): stage ``mine_negatives``.

Round ``k``'s model is run densely over the ROI blocks of the training slides by the inference
loop itself (:func:`wsiscan.infer.iter_dense_tiles`: its prefetching block reader and
:func:`wsiscan.dense.dense_tiles`). Every map cell whose tumour probability exceeds ``threshold``
and whose patch centre lies at least ``margin_um`` outside the tumour annotations (all of a
normal slide counts) is a false positive; its patch centre (cell ``(i, j)`` -> level-0
``(j*Sd + Sd//2, i*Sd + Sd//2)``, the centre of the patch the map scored) becomes a hard negative.
The default margin, 75 um, is the Camelyon16 FROC distance within which a detection still counts
as a hit, so a mined cell is one that evaluation would count as a false positive.

``block_fraction`` < 1 scans a seeded random share of each slide's blocks (a different share in
each round) to bound the cost on a small compute budget; 1 (the default) scans them all, as the
paper does.

Per slide at most ``max_per_slide`` cells are kept, chosen uniformly at random (seeded) over the
slide's false-positive area with bounded memory, then ``max_per_round`` over all slides with
equal per-slide shares. ``hard_negatives.h5`` is a patch table (:mod:`wsiscan.formats.patches`)
with ``probability``; its slide table is that of the base patches, so the validation split
carries over.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError
from .formats.patches import LABEL_NORMAL, PatchTable, read_patch_table, write_patch_table
from .formats.rois import RoiGrid, read_rois
from .geometry import Geometry
from .params import MineNegativesParams, result_fields
from .patches import (
    MAX_RASTER_SIDE,
    border_distance_um,
    raster_downsample,
    stable_rng,
    water_fill,
)

if TYPE_CHECKING:
    from .annotations import AnnotationGroups

log = logging.getLogger(__name__)


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
        groups: AnnotationGroups | None = None,
    ) -> None:
        from .annotations import DEFAULT_GROUPS, rasterize

        self.ds = raster_downsample(slide_wh, mpp, raster_mpp, MAX_RASTER_SIDE)
        self.raster_um = self.ds * mpp
        shape = (math.ceil(slide_wh[1] / self.ds), math.ceil(slide_wh[0] / self.ds))
        groups = groups or DEFAULT_GROUPS
        tumour = rasterize(annotations, shape, self.ds, groups) if annotations else None
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


def block_subset(grid: RoiGrid, fraction: float, rng: np.random.Generator) -> RoiGrid:
    """``grid`` itself when ``fraction`` is 1, else a random ``fraction`` of its blocks (at least
    one), in grid order."""
    if fraction >= 1.0:
        return grid
    n = grid.n_blocks
    k = min(n, max(1, int(round(fraction * n))))
    keep = np.sort(rng.choice(n, size=k, replace=False)) if n else np.zeros(0, np.int64)
    return grid.subset(keep)


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


def slide_tumour_distance(
    table: PatchTable, i: int, grid: RoiGrid, params: MineNegativesParams
) -> TumourDistance:
    """The tumour distance bound of slide ``i`` of the patch table (its annotation's tumour
    polygons, groups from ``params``; none for a slide without any)."""
    from .annotations import AnnotationGroups, read_slide_annotations, split_groups

    groups = AnnotationGroups.of(params)
    sid, annotation = table.slide_id[i], table.slide_annotation[i]
    polygons: list[Any] = []
    if annotation:
        anns = read_slide_annotations(
            annotation,
            grid.slide_wh,
            slide_id=sid,
            groups=groups,
            tumour_slide=table.slide_label[i] == "tumor",
        )
        if split_groups(anns, groups)[0]:
            polygons = anns
    return TumourDistance(
        polygons, grid.slide_wh, grid.mpp, params.raster_mpp, params.margin_um, groups
    )


def mine_slide(
    model: Any,
    slide_path: str,
    grid: RoiGrid,
    tumour: TumourDistance,
    params: MineNegativesParams,
    device: Any,
    keep: int,
    rng: np.random.Generator,
    stain: Any = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Scan ``grid``'s blocks; return ``(centres, probabilities, n_false_positive_cells)`` with at
    most ``keep`` centres chosen uniformly among the slide's false-positive cells. ``stain``: the
    slide's map onto the model's stain reference (None: as scanned)."""
    from .infer import iter_dense_tiles

    reservoir = _Reservoir(keep, rng)
    tiles = iter_dense_tiles(
        model,
        slide_path,
        grid,
        batch_size=params.batch_size,
        workers=params.workers,
        device=device,
        amp=params.amp and device.type == "cuda",
        dense_mode=params.dense_mode,
        config_keys=("train.mine.batch_size", "train.mine.workers"),
        stain=stain,
    )
    for start, batch in tiles:
        xy, prob = cells_above(
            batch, grid.grid_xy[start : start + len(batch)], grid.geometry, params.threshold,
            grid.slide_wh,
        )  # fmt: skip
        far = tumour.distance_um(xy) >= params.margin_um
        reservoir.add(xy[far], prob[far])
        del batch, xy, prob, far  # not alive while the next batch is computed (iter_dense_tiles)
    order = np.lexsort((reservoir.xy[:, 0], reservoir.xy[:, 1])) if len(reservoir.xy) else []
    return reservoir.xy[order], reservoir.prob[order], reservoir.seen


def cap_per_round(
    found: list[tuple[np.ndarray, np.ndarray]], table: PatchTable, params: MineNegativesParams,
    round_index: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:  # fmt: skip
    """At most ``max_per_round`` hard negatives over all slides (equal per-slide shares, seeded)."""
    alloc = water_fill(params.max_per_round, [len(xy) for xy, _ in found])
    xy_parts, prob_parts = [], []
    for i, ((xy, prob), k) in enumerate(zip(found, alloc, strict=True)):
        if k < len(xy):
            rng = stable_rng(params.seed, round_index, "mine-cap", table.slide_id[i])
            pick = np.sort(rng.choice(len(xy), size=int(k), replace=False))
            xy, prob = xy[pick], prob[pick]
        xy_parts.append(xy)
        prob_parts.append(prob)
    return xy_parts, prob_parts


def mine_slides(
    net: Any,
    table: PatchTable,
    grids: dict[str, RoiGrid],
    params: MineNegativesParams,
    device: Any,
    round_index: int,
    model_path: str | Path | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[np.ndarray, np.ndarray]]]:
    """Mine every slide of ``table``: per-slide records and the kept ``(centres, probabilities)``.
    A model with a stain reference (``model_path``) sees every slide normalised to it."""
    from .stain import model_stain_map

    per_slide, found = [], []
    for i, sid in enumerate(table.slide_id):
        t_slide = time.perf_counter()
        grid = block_subset(
            grids[sid],
            params.block_fraction,
            stable_rng(params.seed, round_index, "mine-blocks", sid),
        )
        tumour = slide_tumour_distance(table, i, grid, params)
        rng = stable_rng(params.seed, round_index, "mine", sid)
        stain = model_stain_map(str(model_path), table.slide_path[i], sid) if model_path else None
        xy, prob, n_fp = mine_slide(
            net, table.slide_path[i], grid, tumour, params, device, params.max_per_slide, rng,
            stain,
        )  # fmt: skip
        found.append((xy, prob))
        area_mm2 = n_fp * (grid.geometry.Sd * grid.mpp / 1000.0) ** 2
        per_slide.append(
            {
                "slide_id": sid,
                "label": table.slide_label[i],
                "validation": bool(table.slide_is_val[i]),
                "blocks": grid.n_blocks,
                "false_positive_cells": int(n_fp),
                "false_positive_area_mm2": area_mm2,
                "candidates_kept": int(len(xy)),
            }
        )
        log.info(
            "%s (%s): %d blocks, %d cells above %.2f outside tumour (%.3f mm2), kept %d, %.1f s",
            sid,
            table.slide_label[i],
            grid.n_blocks,
            n_fp,
            params.threshold,
            area_mm2,
            len(xy),
            time.perf_counter() - t_slide,
        )
    return per_slide, found


def hard_negative_table(
    table: PatchTable, xy_parts: list[np.ndarray], prob_parts: list[np.ndarray]
) -> PatchTable:
    """The hard negatives of every slide of ``table`` (same slide table, label normal)."""
    n = int(sum(len(x) for x in xy_parts))
    return table.with_patches(
        level0_xy=np.concatenate(xy_parts) if n else np.zeros((0, 2), np.int64),
        label=np.full(n, LABEL_NORMAL, np.uint8),
        slide_index=np.concatenate([np.full(len(x), i, np.int32) for i, x in enumerate(xy_parts)]),
        probability=np.concatenate(prob_parts) if n else np.zeros(0, np.float32),
    )


def _mean_normal(per_slide: list[dict[str, Any]]) -> float | None:
    normal = [r["false_positive_cells"] for r in per_slide if r["label"] == "normal"]
    return float(np.mean(normal)) if normal else None


def mine_negatives(
    patches: str | Path,
    model: str | Path,
    rois: Sequence[str | Path],
    out_hard_negatives: str | Path,
    params: MineNegativesParams,
    *,
    round_index: int,
) -> dict[str, Any]:
    """Stage ``mine_negatives``: the false positives of ``model`` (round ``round_index``) on the
    slides of the patch table ``patches`` -> ``hard_negatives.h5``.

    ``rois`` are the slides' ``rois.h5`` (matched by slide ID; every slide of the table needs
    one). Returns a summary with the false-positive cell count of every slide.
    """
    import torch

    from .fileio import sha256_file
    from .infer import load_scan_model, resolve_device

    t0 = time.perf_counter()
    table = read_patch_table(patches)
    grids = grids_by_slide(table, rois)
    device = resolve_device(params.device, "train.device")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(int(params.threads))
    try:
        net, model_attrs = load_scan_model(model, grids[table.slide_id[0]].geometry, device)
        per_slide, found = mine_slides(net, table, grids, params, device, round_index, model)
    finally:
        torch.set_num_threads(saved_threads)
    xy_parts, prob_parts = cap_per_round(found, table, params, round_index)
    for record, xy in zip(per_slide, xy_parts, strict=True):
        record["hard_negatives"] = int(len(xy))
    out = hard_negative_table(table, xy_parts, prob_parts)
    summary = {
        "path": str(out_hard_negatives),
        "round": int(round_index),
        "hard_negatives": len(out),
        "false_positive_cells": int(sum(r["false_positive_cells"] for r in per_slide)),
        "false_positive_cells_per_normal_slide": _mean_normal(per_slide),
        "slides": per_slide,
    }
    attrs = {
        "kind": "hard_negatives",
        "round": int(round_index),
        "model_sha256": model_attrs["model_checksum"],
        "patches_sha256": sha256_file(patches),
        "Lf": table.attrs.get("Lf", 0),
        "Sf": table.attrs.get("Sf", 0),
        **{f"geometry_{k}": v for k, v in grids[table.slide_id[0]].geometry.as_attrs().items()},
        **result_fields(params),
        "summary_json": json.dumps({k: v for k, v in summary.items() if k != "path"}),
    }
    write_patch_table(out_hard_negatives, out, attrs)
    n = len(out)
    log.info(
        "round %d: %d hard negatives from %d false-positive cells on %d slides in %.1f s",
        round_index,
        n,
        summary["false_positive_cells"],
        len(per_slide),
        time.perf_counter() - t0,
    )
    if not n:
        log.warning(
            "round %d: no false positives above %.2f: no hard negatives",
            round_index,
            params.threshold,
        )
    return summary


def grids_by_slide(table: PatchTable, rois: Sequence[str | Path]) -> dict[str, RoiGrid]:
    """The ROI grid of every slide of ``table`` from ``rois`` (matched by slide ID), all of one
    geometry; a missing slide is a :class:`ConfigError`."""
    grids = {}
    for path in rois:
        grid = read_rois(path)
        grids[grid.slide_id] = grid
    missing = [s for s in table.slide_id if s not in grids]
    if missing:
        raise ConfigError(f"mine_negatives: no rois.h5 given for training slide(s) {missing}")
    checksums = {grids[s].geometry.checksum() for s in table.slide_id}
    if len(checksums) > 1:
        raise ConfigError("mine_negatives: the training slides' ROI grids differ in geometry")
    return grids
