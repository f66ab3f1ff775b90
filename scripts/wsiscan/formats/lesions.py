"""``results/{slide}/lesions.csv`` and ``score.json``: a slide's lesion points and its score
(written by ``detect``).

``lesions.csv``: the Camelyon16 ``confidence,X,Y`` columns (level-0 integer pixels), one lesion
candidate per line, confidence descending, with the header line ``confidence,x,y``. The plain
Camelyon16 submission form is the same lines without a header (``write_lesions_csv(...,
header=False)``; a slide without detections is a 0-byte file).

:func:`read_lesions_csv` reads both forms: a first line whose fields are the names
``confidence,x,y`` (any case) is a header, one whose fields are numbers is a detection; a 0-byte
(or blank) file and a header-only file hold no detection.

``score.json``: ``{"slide_id", "score", "score_method", ...}`` with the detection settings, the
map's stride and mpp, ``model_checksum`` and ``wsiscan_version``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import SlideError
from ..fileio import write_json, write_text

COLUMNS = ("confidence", "x", "y")
#: level-0 coordinates at or beyond this are not pixels of any slide (and would overflow int64)
MAX_COORDINATE = 2.0**53


def format_confidence(value: float) -> str:
    """Shortest decimal that reads back as ``value``; for a float32 map value, the shortest one
    that reads back as that float32 (``0.7`` rather than ``0.699999988``). Order is preserved."""
    f32 = np.float32(value)
    return str(f32) if float(f32) == float(value) else repr(float(value))


def write_lesions_csv(path: str | Path, points: np.ndarray, *, header: bool = True) -> None:
    """Write ``(K, 3) [confidence, x, y]`` as CSV (``confidence,x,y``; x, y int), atomically.

    ``header=False`` gives a Camelyon16 submission file.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    lines = [",".join(COLUMNS)] if header else []
    lines += [f"{format_confidence(c)},{int(x)},{int(y)}" for c, x, y in points]
    write_text(path, "".join(line + "\n" for line in lines))


def _header_line(path: Path, slide_id: str | None) -> bool:
    """Whether the file's first non-blank line is the ``confidence,x,y`` header (any case); a
    line of anything else but numbers is an error."""
    with path.open("rb") as fh:
        for raw in fh:
            try:
                line = raw.decode("utf-8-sig").strip()
            except UnicodeDecodeError as exc:
                raise SlideError(slide_id, path, f"cannot read lesions CSV: {exc}")
            if not line:
                continue
            fields = [f.strip() for f in line.split(",")]
            if [f.lower() for f in fields] == list(COLUMNS):
                return True
            try:
                [float(f) for f in fields]
            except ValueError:
                raise SlideError(
                    slide_id,
                    path,
                    f"columns must be confidence,x,y (header optional); first line {line[:80]!r}",
                )
            return False
    return False


def read_lesions_csv(path: str | Path, slide_id: str | None = None) -> pd.DataFrame:
    """A lesions CSV as float64 ``confidence`` and int64 level-0 ``x``, ``y``; with the header
    line or without it (Camelyon16), empty for a 0-byte or header-only file."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(slide_id, path, "lesions file not found")
    try:
        header = _header_line(path, slide_id)
        df = pd.read_csv(
            path,
            header=None,
            skiprows=1 if header else 0,
            skip_blank_lines=True,
            encoding="utf-8-sig",
            dtype=str,
        )
    except pd.errors.EmptyDataError:
        df = pd.DataFrame(columns=list(COLUMNS))
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SlideError(slide_id, path, f"cannot read lesions CSV: {exc}")
    if df.shape[1] != len(COLUMNS):
        raise SlideError(
            slide_id,
            path,
            f"lesions CSV lines must hold 3 values (confidence,x,y), not {df.shape[1]}",
        )
    df.columns = list(COLUMNS)
    try:
        values = {c: df[c].astype(np.float64).to_numpy() for c in COLUMNS}
    except (ValueError, TypeError) as exc:
        raise SlideError(slide_id, path, f"non-numeric value in lesions CSV: {exc}")
    if not np.all(np.isfinite(values["confidence"])):
        raise SlideError(slide_id, path, "NaN or infinite confidence in lesions CSV")
    for c in ("x", "y"):
        bad = ~(np.abs(values[c]) < MAX_COORDINATE)  # NaN too
        if bad.any():
            raise SlideError(
                slide_id, path, f"{c} = {float(values[c][bad][0])!r} in lesions CSV is not a pixel"
            )
    out = pd.DataFrame(
        {
            "confidence": values["confidence"],
            "x": np.floor(values["x"]).astype(np.int64),
            "y": np.floor(values["y"]).astype(np.int64),
        }
    )
    return out.reset_index(drop=True)


def write_score_json(path: str | Path, record: dict[str, Any]) -> None:
    """Write the slide's score record (needs ``slide_id`` and ``score``), atomically."""
    for key in ("slide_id", "score"):
        if key not in record:
            raise ValueError(f"score record lacks {key!r}")
    write_json(path, record)


def read_score_json(path: str | Path, slide_id: str | None = None) -> dict[str, Any]:
    """``score.json`` of the detect stage; checks ``score`` and the slide ID."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(slide_id, path, "score file not found")
    try:
        rec = json.loads(path.read_text())
        float(rec["score"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SlideError(slide_id, path, f"bad score JSON: {exc!r}")
    if slide_id and rec.get("slide_id") not in (None, slide_id):
        raise SlideError(slide_id, path, f"score file belongs to slide {rec['slide_id']!r}")
    return rec
