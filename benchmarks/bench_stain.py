"""Acquisition variation (issue 17): FROC and slide AUC per test centre for three trainings.

``stain_centres``: the demo cohort itself (``config/slides.tsv``, the slides the demo's generator
writes, at the demo's size and seed): training slides from centres A and B, test slides from A, B
and the held-out C (a stain outside A's and B's; :data:`wsiscan.synth.DEMO_CENTRES`). Three
trainings with the demo's recipe (``config/config.yaml``: two rounds with hard-negative mining
between them, the round plan of :func:`wsiscan.dag.round_plan`), which differ only in the stain
handling:

* ``none``: no stain augmentation (no HED, no colour jitter; flips and rotations kept);
* ``hed``: HED augmentation at the config's strength (``train.augment.hed_scale``/``hed_shift``);
* ``macenko``: Macenko normalisation (``stain.normalisation: macenko``), no HED.

Every stage is the package's own function with the settings the workflow would pass
(:func:`wsiscan.dag.stage_values`); the three trainings run at once, each in a process of its own; slides, tissue masks, ROI grids and the
base patches are shared by the three trainings (none of them depends on the stain settings).
Each training's test slides go through infer, stitch, detect and evaluate; ``metrics.json``'s
``centres`` gives each centre's FROC and AUC. Figures: FROC and AUC of every training on every
centre, and the gap ``mean(FROC A, FROC B) - FROC C``; goals: the gap at most 0.05 for ``hed``
and ``macenko``, at least 0.1 (a visible drop) for ``none``.

The smoke run (``smoke=True``) does the same on tiny slides (two training and six test slides,
a few patches, one round without mining): a harness check, not a measurement. It still trains
three times and scans 18 small slides (minutes on 2 cores), so the test suite's ``--smoke`` run
leaves it out (``benchmarks.run.HEAVY_SMOKE``); ``--smoke --only stain_centres`` runs it.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, cache_dir, figure, load_average, round_sig

ARMS: dict[str, dict[str, Any]] = {
    "none": {"train.augment.hed_scale": 0.0, "train.augment.hed_shift": 0.0},
    "hed": {},
    "macenko": {
        "train.augment.hed_scale": 0.0,
        "train.augment.hed_shift": 0.0,
        "stain.normalisation": "macenko",
    },
}
NO_JITTER = {f"train.augment.{k}": 0.0 for k in ("brightness", "contrast", "saturation", "hue")}
TRAINING_CENTRES = ("A", "B")
HELD_OUT = "C"
GAP_GOAL = 0.05
DROP_GOAL = 0.1


# -- the cohort and the config ---------------------------------------------------------------------
def _config(smoke: bool) -> dict[str, Any]:
    """The demo config (validated, defaults filled in); smoke: tiny slides and training."""
    import yaml

    from wsiscan.config import validate_config

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    if smoke:
        cfg["demo"].update(width_px=2000, height_px=1800, size_jitter=0.0)
        cfg["scan"]["n"] = 4
        cfg["train"].update(
            rounds=1, n_patches=64, patches_per_epoch=16, batch_size=8, val_patches=8, epochs=1
        )
        cfg["evaluate"]["bootstrap"] = 0
    cfg["evaluate"]["bootstrap"] = min(cfg["evaluate"].get("bootstrap", 1000), 200)
    cfg["infer"]["workers"] = 0 if smoke else cfg["infer"].get("workers", 2)
    return validate_config(cfg)


def _sheet_rows(smoke: bool) -> list[dict[str, str]]:
    """``slide_id, label, split, centre`` of the benchmark cohort."""
    rows = []
    if smoke:
        for c in TRAINING_CENTRES:
            rows.append({"slide_id": f"train_tumor_{c}", "label": "tumor", "split": "train",
                         "centre": c})  # fmt: skip
        rows[-1]["label"], rows[-1]["slide_id"] = "normal", "train_normal_B"
        for c in (*TRAINING_CENTRES, HELD_OUT):
            for label in ("tumor", "normal"):
                rows.append({"slide_id": f"test_{label}_{c}", "label": label, "split": "test",
                             "centre": c})  # fmt: skip
        return rows
    with open(REPO / "config" / "slides.tsv") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            rows.append({k: row[k] for k in ("slide_id", "label", "split", "centre")})
    return rows


def _with(cfg: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        node = out
        *parents, name = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = value
    return out


def _record(cls, cfg: dict[str, Any], **context: Any):
    from wsiscan.dag import stage_values

    values = stage_values(cfg, cls.STAGE, runtime=False, **context)
    values.update(stage_values(cfg, cls.STAGE, runtime=True, **context))
    return cls(**values)


# -- the shared part: slides, masks, grids, base patches ---------------------------------------------
def _prepare(root: Path, cfg: dict[str, Any], rows: list[dict[str, str]]) -> Path:
    """Slides (demo generator, each with its centre), tissue masks and ROI grids in ``root``, and
    the sheet ``root/slides.tsv``; files already there are kept (the cache)."""
    from wsiscan.grid import roi_grid
    from wsiscan.params import RoiGridParams, SynthSlideParams, TissueMaskParams
    from wsiscan.synth import synth_slide
    from wsiscan.tissue import tissue_mask

    synth = _record(SynthSlideParams, cfg)
    for row in rows:
        sid = row["slide_id"]
        tif, xml = root / "data" / f"{sid}.tif", root / "data" / f"{sid}.xml"
        row["path"] = str(tif)
        row["annotation"] = str(xml) if row["label"] == "tumor" else ""
        if not tif.is_file():
            synth_slide(tif, xml, synth, slide_id=sid, label=row["label"], centre=row["centre"])
        prep = root / "prep" / sid
        if not (prep / "rois.h5").is_file():
            params = _record(TissueMaskParams, cfg, slide_path=str(tif))
            tissue_mask(tif, prep / "tissue.png", prep / "qc.png", params, slide_id=sid)
            roi_grid(tif, prep / "tissue.png", prep / "rois.h5", _record(RoiGridParams, cfg),
                     slide_id=sid)  # fmt: skip
    sheet = root / "slides.tsv"
    columns = ["slide_id", "path", "annotation", "label", "split", "centre"]
    with open(sheet, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return sheet


# -- one training and its evaluation -----------------------------------------------------------------
def _arm(
    root: Path, out: Path, cfg: dict[str, Any], sheet: Path, rows: list[dict[str, str]]
) -> dict[str, Any]:
    """Train the rounds of ``cfg`` (mining between them), scan and evaluate the test slides."""
    from wsiscan.detect import detect
    from wsiscan.evaluate import evaluate
    from wsiscan.infer import infer
    from wsiscan.mining import mine_negatives
    from wsiscan.params import (
        DetectParams,
        EvaluateParams,
        InferParams,
        MineNegativesParams,
        StitchParams,
        TrainRoundParams,
    )
    from wsiscan.stitch import stitch
    from wsiscan.train import train_round

    t0 = time.perf_counter()
    train_ids = [r["slide_id"] for r in rows if r["split"] == "train"]
    patches = root / "patches.h5"
    hard: list[Path] = []
    model = None
    rounds = int(cfg["train"]["rounds"])
    for k in range(1, rounds + 1):
        rdir = out / f"round{k}"
        model = rdir / "model.pt"
        if not model.is_file():
            train_round(
                patches, model, rdir / "metrics.json", rdir / "loss.png",
                _record(TrainRoundParams, cfg, round=k), round_index=k, hard_negatives=hard,
                init_model=out / f"round{k - 1}" / "model.pt" if k > 1 else None,
            )  # fmt: skip
        if k < rounds:
            h = rdir / "hard_negatives.h5"
            if not h.is_file():
                mine_negatives(
                    patches, model, [root / "prep" / s / "rois.h5" for s in train_ids], h,
                    _record(MineNegativesParams, cfg), round_index=k,
                )  # fmt: skip
            hard.append(h)
    t_train = time.perf_counter() - t0
    for row in rows:
        if row["split"] != "test":
            continue
        sid, prep, res = row["slide_id"], root / "prep" / row["slide_id"], out / row["slide_id"]
        if (res / "score.json").is_file():
            continue
        infer(row["path"], prep / "rois.h5", model, res / "tiles.h5", _record(InferParams, cfg),
              slide_id=sid)  # fmt: skip
        stitch(row["path"], res / "tiles.h5", prep / "tissue.png", res / "probmap.h5",
               res / "heatmap.png", _record(StitchParams, cfg), slide_id=sid)  # fmt: skip
        detect(res / "probmap.h5", res / "lesions.csv", res / "score.json",
               res / "lesions.geojson", res / "lesions.xml", _record(DetectParams, cfg),
               slide_id=sid)  # fmt: skip
        (res / "tiles.h5").unlink()
    metrics = evaluate(sheet, model, _record(EvaluateParams, cfg), results_dir=out,
                       out_dir=out / "cohort")  # fmt: skip
    return {"metrics": metrics, "train_s": t_train, "wall_s": time.perf_counter() - t0}


def _arm_to_file(
    root: Path, out: Path, cfg: dict[str, Any], sheet: Path, rows: list[dict[str, str]]
) -> None:
    """:func:`_arm` in a process of its own; its result goes to ``out/arm.json``."""
    from wsiscan.fileio import write_json

    logging.basicConfig(level=logging.WARNING)
    write_json(out / "arm.json", _arm(root, out, cfg, sheet, rows))


def _run_arms(
    root: Path, cfg: dict[str, Any], sheet: Path, rows: list[dict[str, str]]
) -> dict[str, dict[str, Any]]:
    """The three trainings, each in its own (spawned) process, all at once: they share nothing
    but the prepared inputs, and on a shared machine they use its idle cores together (a
    training with 2 threads leaves most of them waiting). An arm whose ``arm.json`` exists is
    read back (the cache)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = {}
    for arm, changes in ARMS.items():
        out = root / arm
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "arm.json").is_file():
            args = (root, out, _with(cfg, changes), sheet, rows)
            procs[arm] = ctx.Process(target=_arm_to_file, args=args, name=f"arm-{arm}")
            procs[arm].start()
    for arm, proc in procs.items():
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"stain_centres: the {arm} training failed (exit {proc.exitcode})")
    return {arm: json.loads((root / arm / "arm.json").read_text()) for arm in ARMS}


def bench_stain_centres(smoke: bool) -> dict[str, Any]:
    """FROC and AUC per test centre of the trainings without stain augmentation, with HED
    augmentation and with Macenko normalisation (see the module docstring)."""
    from wsiscan.params import TrainPatchesParams
    from wsiscan.patches import train_patches

    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    cfg = _with(_config(smoke), NO_JITTER)
    rows = _sheet_rows(smoke)
    root = cache_dir(smoke) / "stain_centres"
    root.mkdir(parents=True, exist_ok=True)
    sheet = _prepare(root, cfg, rows)
    if not (root / "patches.h5").is_file():
        masks = [
            root / "prep" / r["slide_id"] / "tissue.png" for r in rows if r["split"] == "train"
        ]
        train_patches(sheet, masks, root / "patches.h5", _record(TrainPatchesParams, cfg))
    t_prep = time.perf_counter() - t0
    figures, arms = [], {}
    centres = (*TRAINING_CENTRES, HELD_OUT)
    results = _run_arms(root, cfg, sheet, rows)
    for arm, changes in ARMS.items():
        result = results[arm]
        per_centre = result["metrics"].get("centres", {})
        arms[arm] = {
            "settings": changes,
            "overall": {k: result["metrics"][k] for k in ("froc", "auc", "fp_per_normal_slide")},
            "centres": per_centre,
            "train_s": round(result["train_s"], 1),
            "wall_s": round(result["wall_s"], 1),
        }
        frocs = {c: (per_centre.get(c) or {}).get("froc") for c in centres}
        for c in centres:
            figures.append(figure(f"{arm}_froc_{c}", frocs[c] or 0.0, "FROC"))
            figures.append(figure(f"{arm}_auc_{c}", (per_centre.get(c) or {}).get("auc") or 0.0,
                                  "AUC"))  # fmt: skip
        known = [frocs[c] for c in TRAINING_CENTRES if frocs[c] is not None]
        gap = (sum(known) / len(known) if known else 0.0) - (frocs[HELD_OUT] or 0.0)
        arms[arm]["held_out_gap"] = round_sig(gap)
        goal = f">= {DROP_GOAL}" if arm == "none" else f"<= {GAP_GOAL}"
        figures.append(figure(f"{arm}_held_out_froc_gap", gap, "FROC", None if smoke else goal))
    return {
        "figures": figures,
        "arms": arms,
        "slides": {
            "train": sum(r["split"] == "train" for r in rows),
            "test_per_centre": {
                c: sum(r["centre"] == c and r["split"] == "test" for r in rows) for c in centres
            },  # fmt: skip
        },
        "prep_s": round(t_prep, 1),
        "load_average": load_average(),
    }


BENCHMARKS = {"stain_centres": bench_stain_centres}
