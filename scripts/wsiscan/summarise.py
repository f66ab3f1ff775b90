"""The ``summarise`` stage: the cohort as the pathologist reads it, labelled or not.

For every scanned slide (the sheet's ``evaluate.split``, label ``unknown`` included), from its
``score.json``: the slide score, the call at the operating threshold, the lesions, the longest
diameter of the largest and its size category (:mod:`wsiscan.staging`); for a slide whose
per-slide job failed, the stage and cause of its ``FAILED.json``. With a ``patient`` column in
the sheet, each patient's pN stage; with true categories (the sheet's ``true_category``) or a
Camelyon17 CSV (``summarise.truth``), their evaluation. Layouts: :mod:`wsiscan.formats.summary`.

The operating threshold: ``operating.threshold`` when set (the threshold a labelled cohort's
``metrics.json`` reports under ``operating_threshold``), else chosen on this cohort's labelled
slides by ``operating.method`` (:func:`wsiscan.evaluate.operating_threshold`, the same choice
``metrics.json`` reports), else (no labelled slide) ``detect.threshold``, which the summary says.

The lesions of a slide are the regions of its stitched lesion mask (``stitch.threshold``, opened
and closed) whose maximum probability reaches the operating threshold; their longest diameter is
measured on that mask at the map's resolution (:func:`wsiscan.detect.mask_regions`: the maximum
Feret diameter of the region's cells, precise to one map cell, ``Sd * mpp`` um). A slide called
positive is categorised by its largest lesion; a positive call without such a lesion (its focus
lies below ``stitch.threshold`` or was removed by the mask's opening) is counted as isolated
tumour cells, with a note.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .errors import SlideError
from .faults import failed_slides, failure_record_path, read_failure_record
from .formats.lesions import read_score_json
from .formats.summary import (
    PATIENT_COLUMNS,
    write_patients_tsv,
    write_staging_json,
    write_summary_tsv,
)
from .params import SummariseParams
from .staging import (
    CATEGORIES,
    KAPPA_STAGES,
    confusion,
    pn_stage,
    read_camelyon17_csv,
    size_category,
    stage_kappa,
)

log = logging.getLogger(__name__)

LABELS = ("tumor", "normal")
#: cause listed for a slide the run left out as failed whose failure record is gone since
RERUN_SINCE = "its job had failed when this run was planned and was re-run since: run again"
NO_LESION_NOTE = (
    "score at or above the threshold but no lesion of the lesion mask reaches it (below "
    "stitch.threshold or removed by its opening): counted as isolated tumour cells"
)


# -- the threshold ---------------------------------------------------------------------------------
def choose_threshold(
    params: SummariseParams, labelled: list[tuple[str, float]], detect_threshold: float
) -> dict[str, Any]:
    """``{"threshold", "source", ...}``: ``params.threshold``, else chosen on ``labelled``
    (``(label, score)`` of the labelled scanned slides), else ``detect_threshold``."""
    from .evaluate import operating_threshold

    if params.threshold is not None:
        return {"threshold": float(params.threshold), "source": "operating.threshold"}
    if labelled:
        y = np.array([label == "tumor" for label, _ in labelled], dtype=np.int64)
        s = np.array([score for _, score in labelled], dtype=np.float64)
        chosen = operating_threshold(y, s, params.method, params.target_sensitivity)
        if chosen is not None:
            source = f"chosen on the {len(labelled)} labelled slides ({params.method})"
            return {**chosen, "source": source}
    return {
        "threshold": float(detect_threshold),
        "source": "detect.threshold (no labelled slide to choose on; set operating.threshold)",
    }


# -- one slide -------------------------------------------------------------------------------------
def slide_row(record: dict[str, Any], threshold: float) -> dict[str, Any]:
    """The summary of one scanned slide from its ``score.json`` record."""
    score = float(record["score"])
    positive = score >= threshold
    lesions = [r for r in record.get("regions", []) if float(r["max_probability"]) >= threshold]
    largest_mm = max((float(r["longest_diameter_um"]) for r in lesions), default=None)
    largest_mm = None if largest_mm is None else largest_mm / 1000.0
    note = ""
    if not positive:
        category = "negative"
    elif largest_mm is None:
        category, note = "itc", NO_LESION_NOTE
    else:
        category = size_category(largest_mm)
    return {
        "status": "ok",
        "score": score,
        "threshold": threshold,
        "call": "positive" if positive else "negative",
        "detected_lesions": len(lesions),
        "largest_diameter_mm": None if largest_mm is None else round(largest_mm, 4),
        "category": category,
        "failed_stage": "",
        "failure_cause": "",
        "note": note,
    }


def failed_row(record: dict[str, Any], threshold: float) -> dict[str, Any]:
    """The summary of a slide whose per-slide job failed."""
    return {
        "status": "failed",
        "score": None,
        "threshold": threshold,
        "call": "",
        "detected_lesions": None,
        "largest_diameter_mm": None,
        "category": "",
        "failed_stage": record.get("stage") or "",
        "failure_cause": record.get("cause") or "",
        "note": "",
    }


# -- patients --------------------------------------------------------------------------------------
def patient_table(summary: pd.DataFrame, true_stages: dict[str, str]) -> pd.DataFrame:
    """One row per patient of ``summary["patient"]`` (empty cells: no patient) with its pN stage
    from its slides' categories; a patient with a failed slide gets none."""
    rows = []
    if "patient" not in summary.columns:
        return pd.DataFrame(columns=[c for c in PATIENT_COLUMNS if c != "true_pn_stage"])
    has_truth = "true_category" in summary.columns or bool(true_stages)
    for patient, group in summary[summary["patient"] != ""].groupby("patient", sort=False):
        failed = group.loc[group["status"] != "ok", "slide_id"].tolist()
        cats = group["category"].tolist()
        row: dict[str, Any] = {
            "patient": patient,
            "n_slides": len(group),
            "slides": ",".join(group["slide_id"]),
            "positive_nodes": None if failed else sum(c in ("micro", "macro") for c in cats),
            "pn_stage": "" if failed else pn_stage(cats),
            "note": f"no stage: slides failed: {', '.join(failed)}" if failed else "",
        }
        if has_truth:
            row["true_pn_stage"] = true_stages.get(patient) or _stage_from_truth(group)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[c for c in PATIENT_COLUMNS if c != "true_pn_stage"])
    return pd.DataFrame(rows)


def _stage_from_truth(group: pd.DataFrame) -> str:
    """A patient's true stage from its slides' true categories (all of them known), else ''."""
    if "true_category" not in group.columns or (group["true_category"] == "").any():
        return ""
    return pn_stage(group["true_category"].tolist())


def staging_record(
    summary: pd.DataFrame, patients: pd.DataFrame, threshold: dict[str, Any]
) -> dict[str, Any]:
    """``staging.json``: the threshold, the slide-category confusion matrix and the pN kappa."""
    record: dict[str, Any] = {
        "wsiscan_version": __version__,
        "operating_threshold": threshold,
        "n_slides": int(len(summary)),
        "n_failed": int((summary["status"] != "ok").sum()),
        "categories": {c: int((summary["category"] == c).sum()) for c in CATEGORIES},
        "n_patients": int(len(patients)),
        "slides": None,
        "patients": None,
    }
    if "true_category" in summary.columns:
        rated = summary[(summary["true_category"] != "") & (summary["status"] == "ok")]
        truth, pred = rated["true_category"].tolist(), rated["category"].tolist()
        record["slides"] = {
            "n": len(rated),
            "accuracy": float(np.mean(np.array(truth) == np.array(pred))) if truth else None,
            "confusion": confusion(truth, pred, CATEGORIES),
        }
    if "true_pn_stage" in patients.columns:
        rated = patients[(patients["true_pn_stage"] != "") & (patients["pn_stage"] != "")]
        truth, pred = rated["true_pn_stage"].tolist(), rated["pn_stage"].tolist()
        record["patients"] = {
            "n": len(rated),
            "kappa_quadratic": stage_kappa(truth, pred),
            "confusion": confusion(
                [{"pN3": "pN2"}.get(t, t) for t in truth],
                [{"pN3": "pN2"}.get(p, p) for p in pred],
                KAPPA_STAGES,
            ),
        }
    return record


# -- the stage -------------------------------------------------------------------------------------
def summarise(
    sheet: str | Path,
    results_dir: str | Path,
    out_summary: str | Path,
    out_patients: str | Path,
    out_staging: str | Path,
    params: SummariseParams,
    *,
    truth: str | Path | None = None,
    failed: Sequence[str] | None = None,
    base_dir: str | Path = ".",
) -> pd.DataFrame:
    """Stage ``summarise``: ``summary.tsv``, ``patients.tsv`` and ``staging.json`` of the slides
    of ``params.split`` in ``sheet`` from ``results_dir/<slide_id>/score.json`` (module
    docstring).

    ``failed``: the slides to list as failed (the workflow decides when it plans the run; their
    ``FAILED.json`` gives stage and cause); None: those whose failure record is newer than their
    files (:func:`wsiscan.faults.failed_slides`). A slide that has neither a record nor a
    readable ``score.json`` is listed as failed with the read error. ``truth``: a CSV in the
    Camelyon17 layout (:func:`wsiscan.staging.read_camelyon17_csv`). Returns the summary.
    """
    from .config import load_samples

    results_dir, base_dir = Path(results_dir), Path(base_dir)
    samples = load_samples(sheet, base_dir=base_dir, check_files=False)
    rows = samples[samples["split"] == params.split].to_dict("records")
    if failed is None:
        inputs = {
            r["slide_id"]: [base_dir / p for p in (r["path"], r["annotation"]) if p] for r in rows
        }
        records = failed_slides(results_dir, inputs)
    else:
        records = {
            sid: read_failure_record(failure_record_path(results_dir, sid))
            or {"stage": None, "cause": RERUN_SINCE}
            for sid in failed
        }
    scores: dict[str, dict[str, Any]] = {}
    for row in rows:
        sid = row["slide_id"]
        if sid in records:
            continue
        try:
            scores[sid] = read_score_json(results_dir / sid / "score.json", sid)
        except SlideError as exc:
            records[sid] = {"stage": None, "cause": str(exc)}
    true_slides, true_stages = read_camelyon17_csv(truth) if truth else ({}, {})
    labelled = [
        (r["label"], float(scores[r["slide_id"]]["score"]))
        for r in rows
        if r["label"] in LABELS and r["slide_id"] in scores
    ]
    detect_threshold = next((float(rec["threshold"]) for rec in scores.values()), 0.5)
    threshold = choose_threshold(params, labelled, detect_threshold)
    table = summary_table(rows, scores, records, threshold["threshold"], true_slides)
    patients = patient_table(table, true_stages)
    staging = staging_record(table, patients, threshold)
    write_summary_tsv(out_summary, table)
    write_patients_tsv(out_patients, patients)
    write_staging_json(out_staging, staging)
    log.info(
        "%d slides (%d failed), threshold %.4g (%s): %s; %d patients",
        len(table),
        staging["n_failed"],
        threshold["threshold"],
        threshold["source"],
        ", ".join(f"{n} {c}" for c, n in staging["categories"].items()),
        len(patients),
    )
    return table


def summary_table(
    rows: list[dict],
    scores: dict[str, dict[str, Any]],
    records: dict[str, dict[str, Any]],
    threshold: float,
    true_slides: dict[str, str],
) -> pd.DataFrame:
    """The rows of ``summary.tsv``, in sheet order."""
    out = []
    with_patient = any("patient" in r for r in rows)
    with_truth = bool(true_slides) or any("true_category" in r for r in rows)
    for r in rows:
        sid = r["slide_id"]
        if sid in scores:
            body = slide_row(scores[sid], threshold)
        else:
            body = failed_row(records.get(sid, {}), threshold)
        row = {"slide_id": sid, "label": r["label"], **body}
        if with_patient:
            row["patient"] = r.get("patient", "")
        if with_truth:
            row["true_category"] = r.get("true_category") or true_slides.get(sid, "")
        out.append(row)
    table = pd.DataFrame(out)
    if table.empty:
        table = pd.DataFrame(columns=["slide_id", "label", "status", "category"])
    return table.astype({c: "Int64" for c in ("detected_lesions",) if c in table.columns})
