"""``results/{slide}/lesions.csv`` and ``score.json``: a slide's lesion points and its score
(written by ``detect``).

``lesions.csv``: the Camelyon16 ``confidence,X,Y`` columns (level-0 integer pixels), one lesion
candidate per line, confidence descending, with the header line ``confidence,x,y``.

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


def read_lesions_csv(path: str | Path, slide_id: str | None = None) -> pd.DataFrame:
    """``lesions.csv`` as float64 ``confidence`` and int64 level-0 ``x``, ``y``."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(slide_id, path, "lesions file not found")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SlideError(slide_id, path, f"cannot read lesions CSV: {exc}")
    if list(df.columns) != list(COLUMNS):
        raise SlideError(slide_id, path, f"columns must be confidence,x,y; got {list(df.columns)}")
    try:
        out = pd.DataFrame(
            {
                "confidence": df["confidence"].astype(np.float64),
                "x": np.floor(df["x"].astype(np.float64)).astype(np.int64),
                "y": np.floor(df["y"].astype(np.float64)).astype(np.int64),
            }
        )
    except (ValueError, TypeError) as exc:
        raise SlideError(slide_id, path, f"non-numeric value in lesions CSV: {exc}")
    if not np.all(np.isfinite(out["confidence"])):
        raise SlideError(slide_id, path, "NaN or infinite confidence in lesions CSV")
    return out


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
