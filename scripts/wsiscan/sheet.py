"""``wsiscan sheet``: build the sample sheet (``slides.tsv``) from the public Camelyon16 layout,
or (``--folder``) from a folder of slides of a new cohort, labels unknown
(:func:`build_folder_sheet`).

Expected folders under ``root`` (as downloaded, with the annotation archives extracted)::

    training/tumor/tumor_NNN.tif          training/lesion_annotations/tumor_NNN.xml
    training/normal/normal_NNN.tif
    testing/images/test_NNN.tif           testing/lesion_annotations/test_NNN.xml
    testing/reference.csv                 rows like ``Test_001,Tumor,Macro,Primary`` / ``Test_002,Normal``

Training slides take their label from their folder, test slides from the reference CSV (matched
case-insensitively: ``Test_001`` names ``test_001.tif``); a test slide the reference does not list
is ``unknown``. The slide ID is the file stem. Paths are written as ``root`` was given (give an
absolute ``root`` for a sheet that works from any directory).

The ``centre`` column comes from the training file names (:func:`camelyon16_centre`): Camelyon16's
training slides were scanned at two centres, Radboud UMC (``RUMC``: ``tumor_001``-``tumor_070``,
``normal_001``-``normal_100``) and UMC Utrecht (``UMCU``: ``tumor_071``-``tumor_111``,
``normal_101``-``normal_160``). The test slides come from both, but their names do not say which:
their centre is left empty.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path

import pandas as pd

from .config import SHEET_COLUMNS
from .errors import ConfigError
from .fileio import atomic_write
from .slide import check_slide_id

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".tif", ".tiff")
COLUMNS = [*SHEET_COLUMNS, "centre"]
#: Camelyon16 training slides: (kind, last number of the first centre, first centre, second).
_CAMELYON16_CENTRES = {"tumor": (70, "RUMC", "UMCU"), "normal": (100, "RUMC", "UMCU")}
_LABEL_WORDS = {"tumor": "tumor", "tumour": "tumor", "normal": "normal", "negative": "normal"}


def read_camelyon16_reference(path: str | Path) -> dict[str, str]:
    """Labels of the Camelyon16 test reference CSV: ``{lower-case slide ID: tumor|normal}``.

    Tolerant: comma, semicolon or tab separated, quotes and blanks stripped, a header row and
    extra columns (lesion type, primary) ignored, an ID with a file suffix accepted. A row whose
    label is not Tumor/Normal stops with :class:`ConfigError` naming the line; a repeated ID with
    a different label too.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Camelyon16 reference CSV {str(path)!r} not found")
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    delimiter = max(",;\t", key=text.count)
    labels: dict[str, str] = {}
    for lineno, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
        fields = [f.strip().strip('"').strip() for f in row]
        if not fields or not fields[0] or fields[0].startswith("#"):
            continue
        word = fields[1].lower() if len(fields) > 1 else ""
        if word not in _LABEL_WORDS:
            if lineno == 1:  # a header such as "image,type,..."
                continue
            raise ConfigError(
                f"{path} line {lineno}: expected '<slide>,Tumor|Normal[,...]', got {row!r}"
            )
        sid = (
            Path(fields[0]).stem if Path(fields[0]).suffix.lower() in SLIDE_SUFFIXES else fields[0]
        )
        key = sid.lower()
        label = _LABEL_WORDS[word]
        if labels.get(key, label) != label:
            raise ConfigError(
                f"{path} line {lineno}: {sid} listed as both {labels[key]} and {label}"
            )
        labels[key] = label
    return labels


def _slides(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)


def _annotations(folder: Path) -> dict[str, Path]:
    """``{lower-case stem: path}`` of the ASAP XML files in ``folder``."""
    if not folder.is_dir():
        if folder.with_suffix(".zip").is_file():
            log.warning("%s is not extracted: slides get no annotation", folder.with_suffix(".zip"))
        return {}
    return {p.stem.lower(): p for p in folder.iterdir() if p.suffix.lower() == ".xml"}


def build_camelyon16_sheet(
    root: str | Path, out_tsv: str | Path | None, *, reference_csv: str | Path | None = None
) -> pd.DataFrame:
    """Sample sheet of a Camelyon16 download at ``root``; written to ``out_tsv`` (atomically).

    Columns ``slide_id, path, annotation, label, split, centre`` (annotation empty when there is
    none; label ``tumor``/``normal``/``unknown``; split ``train``/``test``; centre ``RUMC``/``UMCU``
    for the training slides, empty for the test slides). ``reference_csv`` defaults
    to ``root/testing/reference.csv``. Raises :class:`ConfigError` on an invalid or repeated
    slide ID, or when no slide is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"Camelyon16 root {str(root)!r} is not a folder")
    train_xml = _annotations(root / "training" / "lesion_annotations")
    test_xml = _annotations(root / "testing" / "lesion_annotations")
    ref_path = Path(reference_csv) if reference_csv else root / "testing" / "reference.csv"
    test_slides = _slides(root / "testing" / "images")
    if reference_csv or ref_path.is_file():
        reference = read_camelyon16_reference(ref_path)
    else:
        reference = {}
        if test_slides:
            log.warning("no %s: test slides are labelled unknown", ref_path)

    rows: list[dict[str, str]] = []
    for label, folder in (("tumor", "tumor"), ("normal", "normal")):
        for p in _slides(root / "training" / folder):
            ann = train_xml.get(p.stem.lower())
            rows.append(_row(p, ann, label, "train"))
    for p in test_slides:
        ann = test_xml.get(p.stem.lower())
        rows.append(_row(p, ann, reference.get(p.stem.lower(), "unknown"), "test"))
    if not rows:
        raise ConfigError(
            f"no slides under {root} (expected training/tumor, training/normal, testing/images)"
        )
    df = pd.DataFrame(rows, columns=COLUMNS)
    dups = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dups:
        raise ConfigError(f"{root}: slide IDs {dups} occur more than once")

    seen = {s.lower() for s in df["slide_id"]}
    absent = sorted(k for k in reference if k not in seen)
    if absent:
        log.warning("reference lists %d slides without an image: %s", len(absent), absent[:10])
    for r in rows:
        if r["label"] == "tumor" and not r["annotation"]:
            log.warning("%s: tumour slide without lesion annotation", r["slide_id"])
        if r["label"] == "normal" and r["annotation"]:
            log.warning("%s: normal slide with an annotation file", r["slide_id"])
    counts = df.groupby(["split", "label"]).size().to_dict()
    log.info("Camelyon16 sheet: %d slides %s", len(df), counts)
    if out_tsv is not None:
        with atomic_write(out_tsv) as fh:
            df.to_csv(fh, sep="\t", index=False)
    return df


def camelyon16_centre(stem: str) -> str:
    """The centre of a Camelyon16 training slide from its file stem (``tumor_071`` -> ``UMCU``);
    ``""`` for any other name (the test slides)."""
    found = re.fullmatch(r"(tumor|normal)_(\d{3})", stem.lower())
    if not found:
        return ""
    last_first, first, second = _CAMELYON16_CENTRES[found.group(1)]
    return first if int(found.group(2)) <= last_first else second


def _row(path: Path, annotation: Path | None, label: str, split: str) -> dict[str, str]:
    try:
        sid = check_slide_id(path.stem)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}")
    return {
        "slide_id": sid,
        "path": str(path),
        "annotation": str(annotation) if annotation else "",
        "label": label,
        "split": split,
        "centre": camelyon16_centre(sid) if split == "train" else "",
    }


#: File endings of the whole-slide formats OpenSlide reads (a .mrxs slide's data folder beside it).
FOLDER_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
)  # fmt: skip


def folder_slide_id(path: Path) -> str:
    """The slide ID of a file: its stem, every character outside ``[A-Za-z0-9._-]`` made ``_``."""
    import re

    sid = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)
    return "_" + sid if sid in (".", "..") else sid


def build_folder_sheet(
    folder: str | Path,
    out_tsv: str | Path | None,
    *,
    split: str = "test",
    patient_pattern: str | None = None,
    recursive: bool = False,
) -> pd.DataFrame:
    """Sample sheet of the slides in ``folder`` (files ending in :data:`FOLDER_SUFFIXES`, in name
    order; ``recursive``: in its sub-folders too), label ``unknown``, no annotation, split
    ``split`` (the one ``evaluate.split`` scans). ``patient_pattern``: a regular expression whose
    first group, searched in the file name, fills a ``patient`` column (``(patient_[0-9]+)`` for
    Camelyon17 names); a file it does not match gets none. Written to ``out_tsv`` (atomically)
    when given. :class:`ConfigError` when there is no slide or two files give the same ID."""
    import re

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"slide folder {str(folder)!r} is not a folder")
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in found if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
    if not files:
        raise ConfigError(f"no slide files ({', '.join(FOLDER_SUFFIXES)}) in {folder}")
    pattern = re.compile(patient_pattern) if patient_pattern else None
    rows = []
    for p in files:
        row = {"slide_id": folder_slide_id(p), "path": str(p), "annotation": "",
               "label": "unknown", "split": split}  # fmt: skip
        if pattern is not None:
            match = pattern.search(p.name)
            row["patient"] = (match.group(1) if match.groups() else match.group(0)) if match else ""
        rows.append(row)
    df = pd.DataFrame(rows)
    dups = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dups:
        paths = df.loc[df["slide_id"].isin(dups), "path"].tolist()
        raise ConfigError(f"{folder}: files give the same slide IDs {dups}: {paths[:6]}")
    log.info("sheet of %d slides in %s (label unknown, split %s)", len(df), folder, split)
    if out_tsv is not None:
        with atomic_write(out_tsv) as fh:
            df.to_csv(fh, sep="\t", index=False)
    return df
