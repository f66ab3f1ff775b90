"""Lesion size categories (AJCC 8th edition, as the Camelyon17 challenge used them) and the pN
stage of a patient from the categories of its lymph-node slides.

Size categories of a slide, by the longest diameter of its largest metastasis:

* ``negative``: no metastasis;
* ``itc`` (isolated tumour cells): longest diameter <= 0.2 mm;
* ``micro`` (micrometastasis): > 0.2 mm and <= 2 mm;
* ``macro`` (macrometastasis): > 2 mm.

AJCC also counts a cluster of fewer than 200 cells as ITC whatever its extent; a map of tumour
probabilities has no cell count, so the size alone decides here (as in the Camelyon17 reference
labels, which were given by size).

pN stage of a patient (the Camelyon17 rules, one slide per lymph node), from its slides'
categories; ITC do not make a node positive:

* ``pN0``: no micro- or macrometastasis and no ITC;
* ``pN0(i+)``: only ITC;
* ``pN1mi``: micrometastases, no macrometastasis;
* ``pN1``: metastases (micro or macro) in 1 to 3 nodes, at least one a macrometastasis;
* ``pN2``: metastases in 4 to 9 nodes, at least one a macrometastasis;
* ``pN3``: 10 or more positive nodes with a macrometastasis (AJCC pN3a; a Camelyon17 patient has
  five slides and never reaches it; it is not among the challenge's kappa labels).

The Camelyon17 challenge scores pN stages by Cohen's kappa with quadratic weights over the five
stages ``pN0 < pN0(i+) < pN1mi < pN1 < pN2`` (:func:`stage_kappa`, scikit-learn's
``cohen_kappa_score``). Its reference CSV (:func:`read_camelyon17_csv`) has the columns
``patient,stage``: rows ``patient_004.zip,pN1`` give a patient's stage, rows
``patient_004_node_0.tif,macro`` a slide's category.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .errors import ConfigError

ITC_MAX_MM = 0.2  #: longest diameter up to this: isolated tumour cells
MICRO_MAX_MM = 2.0  #: above ITC and up to this: micrometastasis; above: macrometastasis
CATEGORIES = ("negative", "itc", "micro", "macro")  #: slide categories, in order of size
CATEGORY_NAMES = {
    "negative": "negative",
    "itc": "isolated tumour cells",
    "micro": "micrometastasis",
    "macro": "macrometastasis",
}
PN_STAGES = ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2", "pN3")  #: in order of severity
KAPPA_STAGES = PN_STAGES[:5]  #: the stages the Camelyon17 challenge scores
#: tolerance of the category limits (mm): a diameter of exactly 0.2 mm from 25 cells of 8 um is ITC
_LIMIT_TOLERANCE_MM = 1e-9


def size_category(longest_diameter_mm: float | None) -> str:
    """The category of a metastasis of this longest diameter (mm); ``negative`` for None."""
    if longest_diameter_mm is None or not np.isfinite(longest_diameter_mm):
        return "negative"
    d = float(longest_diameter_mm)
    if d < 0:
        raise ValueError(f"a diameter cannot be negative: {d}")
    if d <= ITC_MAX_MM + _LIMIT_TOLERANCE_MM:
        return "itc"
    if d <= MICRO_MAX_MM + _LIMIT_TOLERANCE_MM:
        return "micro"
    return "macro"


def check_category(value: str, where: str) -> str:
    """``value`` (any case, ``"ITC"`` and Camelyon17's spellings included) as a category."""
    word = str(value).strip().lower()
    word = {"isolated tumor cells": "itc", "micrometastasis": "micro"}.get(word, word)
    word = {"macrometastasis": "macro", "none": "negative"}.get(word, word)
    if word not in CATEGORIES:
        raise ConfigError(f"{where}: category must be one of {list(CATEGORIES)}, got {value!r}")
    return word


def pn_stage(categories: Iterable[str]) -> str:
    """The pN stage of a patient whose lymph-node slides have these categories (module rules)."""
    cats = [check_category(c, "pn_stage") for c in categories]
    positive = sum(c in ("micro", "macro") for c in cats)
    if "macro" in cats:
        if positive >= 10:
            return "pN3"
        return "pN2" if positive >= 4 else "pN1"
    if "micro" in cats:
        return "pN1mi"
    if "itc" in cats:
        return "pN0(i+)"
    return "pN0"


def check_stage(value: str, where: str) -> str:
    """``value`` as a pN stage (case-insensitive: ``pn0(i+)`` reads as ``pN0(i+)``)."""
    by_lower = {s.lower(): s for s in PN_STAGES}
    stage = by_lower.get(str(value).strip().lower())
    if stage is None:
        raise ConfigError(f"{where}: pN stage must be one of {list(PN_STAGES)}, got {value!r}")
    return stage


def stage_kappa(truth: Sequence[str], predicted: Sequence[str]) -> float | None:
    """Cohen's kappa with quadratic weights of pN stages (the Camelyon17 patient score), over
    :data:`KAPPA_STAGES` (``pN3`` counts as ``pN2``); None without patients or when it is
    undefined (one stage only in both)."""
    from sklearn.metrics import cohen_kappa_score

    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} true stages for {len(predicted)} predicted ones")
    if not truth:
        return None
    cap = {"pN3": "pN2"}
    t = [cap.get(s, s) for s in truth]
    p = [cap.get(s, s) for s in predicted]
    if len(set(t) | set(p)) < 2:
        return None  # one stage only: chance agreement is 1, kappa is 0/0
    return float(cohen_kappa_score(t, p, labels=list(KAPPA_STAGES), weights="quadratic"))


def confusion(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict:
    """``{"labels", "matrix"}``: ``matrix[i][j]`` counts truth ``labels[i]`` predicted as
    ``labels[j]`` (``sklearn.metrics.confusion_matrix``)."""
    from sklearn.metrics import confusion_matrix

    if not truth:
        matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    else:
        matrix = confusion_matrix(list(truth), list(predicted), labels=list(labels))
    return {"labels": list(labels), "matrix": matrix.astype(int).tolist()}


def read_camelyon17_csv(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """``(slide categories, patient stages)`` of a CSV in the Camelyon17 layout.

    Columns ``patient,stage`` (a header line is optional); a first field ending in ``.zip`` names
    a patient (``patient_004.zip``: patient ``patient_004``), any other a slide by its file stem
    (``patient_004_node_0.tif``: slide ``patient_004_node_0``). :class:`ConfigError` naming the
    line for a value that is neither a category nor a stage.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"truth CSV {str(path)!r} not found")
    slides: dict[str, str] = {}
    patients: dict[str, str] = {}
    text = path.read_text(encoding="utf-8-sig")
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        fields = [f.strip() for f in row]
        if not fields or not fields[0] or fields[0].startswith("#"):
            continue
        if len(fields) < 2:
            raise ConfigError(f"{path} line {lineno}: expected '<file>,<stage>', got {row!r}")
        name, value = fields[0], fields[1]
        if lineno == 1 and value.lower() == "stage":
            continue
        where = f"{path} line {lineno}"
        if name.lower().endswith(".zip"):
            patients[name[: -len(".zip")]] = check_stage(value, where)
        else:
            slides[Path(name).stem if "." in name else name] = check_category(value, where)
    return slides, patients
