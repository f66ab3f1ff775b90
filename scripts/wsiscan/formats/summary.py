"""``results/cohort/summary.tsv``, ``patients.tsv`` and ``staging.json``: the cohort as the
pathologist reads it (written by ``summarise``).

``summary.tsv`` (tab-separated, one row per scanned slide, in sheet order):

==========================  ============================================================================
column                      meaning
==========================  ============================================================================
``slide_id``                the sheet's slide ID
``label``                   the sheet's label (``tumor``, ``normal``, ``unknown``)
``patient``                 the sheet's ``patient`` (only when the sheet has that column)
``status``                  ``ok``, or ``failed`` (its stage and cause in the last columns)
``score``                   slide score: the map's maximum tumour probability
``threshold``               the operating threshold of the call (the same on every row)
``call``                    ``positive`` (score >= threshold) or ``negative``
``detected_lesions``        lesions of the stitched lesion mask whose maximum reaches the threshold
                            (not the ground-truth ``n_lesions`` of ``slides.csv``)
``largest_diameter_mm``     longest diameter of the largest of them (mm; empty without one)
``category``                ``negative``, ``itc``, ``micro`` or ``macro`` (AJCC/Camelyon17 by size)
``true_category``           the supplied truth (only when truth is supplied)
``failed_stage``            the per-slide stage that failed (``FAILED.json``), else empty
``failure_cause``           its cause, else empty
``note``                    anything the row's numbers do not say
==========================  ============================================================================

``patients.tsv`` (one row per patient of the ``patient`` column; only the header when the sheet
has none): ``patient``, ``n_slides``, ``slides`` (comma-separated), ``positive_nodes`` (slides
with a micro- or macrometastasis), ``pn_stage`` (Camelyon17 rules, :mod:`wsiscan.staging`; empty
when one of its slides failed), ``true_pn_stage`` (when truth is supplied), ``note``.

``staging.json``: the operating threshold and where it came from, and, when truth is supplied,
the confusion matrix of the slide categories and Cohen's quadratic weighted kappa of the pN
stages (with their confusion matrix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import SlideError
from ..fileio import atomic_write, write_json

SUMMARY_COLUMNS = (
    "slide_id", "label", "patient", "status", "score", "threshold", "call", "detected_lesions",
    "largest_diameter_mm", "category", "true_category", "failed_stage", "failure_cause", "note",
)  # fmt: skip
#: columns present only when the sheet has patients / truth is supplied
OPTIONAL_SUMMARY_COLUMNS = ("patient", "true_category")
PATIENT_COLUMNS = (
    "patient", "n_slides", "slides", "positive_nodes", "pn_stage", "true_pn_stage", "note",
)  # fmt: skip


def _write_tsv(path: str | Path, table: pd.DataFrame) -> None:
    with atomic_write(path) as fh:
        table.to_csv(fh, sep="\t", index=False, float_format="%.6g")


def write_summary_tsv(path: str | Path, table: pd.DataFrame) -> None:
    """Write ``summary.tsv`` (columns in :data:`SUMMARY_COLUMNS` order), atomically."""
    _write_tsv(path, table[[c for c in SUMMARY_COLUMNS if c in table.columns]])


def write_patients_tsv(path: str | Path, table: pd.DataFrame) -> None:
    """Write ``patients.tsv`` (columns in :data:`PATIENT_COLUMNS` order), atomically."""
    _write_tsv(path, table[[c for c in PATIENT_COLUMNS if c in table.columns]])


def write_staging_json(path: str | Path, record: dict[str, Any]) -> None:
    """Write ``staging.json``, atomically."""
    write_json(path, record)


def _read_tsv(path: str | Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise SlideError(None, path, f"{what} not found")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SlideError(None, path, f"not a readable {what}: {exc}")
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise SlideError(None, path, f"{what} lacks the columns {missing}")
    return table


def read_summary_tsv(path: str | Path) -> pd.DataFrame:
    """``summary.tsv`` as strings (empty cells ``""``); checks the columns every summary has."""
    required = tuple(c for c in SUMMARY_COLUMNS if c not in OPTIONAL_SUMMARY_COLUMNS)
    return _read_tsv(path, required, "cohort summary")


def read_patients_tsv(path: str | Path) -> pd.DataFrame:
    """``patients.tsv`` as strings; checks its columns."""
    required = tuple(c for c in PATIENT_COLUMNS if c != "true_pn_stage")
    return _read_tsv(path, required, "patient table")
