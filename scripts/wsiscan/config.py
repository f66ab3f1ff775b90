"""Config and sample-sheet validation: JSON schemas (via snakemake.utils.validate) plus the checks a
schema cannot express (files exist, IDs unique). Every error names the config key or the sheet row."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from .errors import ConfigError

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "workflow" / "schemas"
SHEET_COLUMNS = ["slide_id", "path", "annotation", "label", "split"]
DEMO_DIR = "data/demo"


def _schema(name: str, schema_dir: Path | None) -> str:
    return str((schema_dir or SCHEMA_DIR) / name)


def _validation_error(exc: Exception):
    """The jsonschema ValidationError inside a Snakemake WorkflowError, if any."""
    import jsonschema

    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, jsonschema.ValidationError):
            return e
        seen.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
        seen.extend(c for c in (e.__cause__, e.__context__) if c is not None)
    return None


def _describe(err) -> str:
    """``key.sub: message`` for a jsonschema error (the best match among alternatives)."""
    import jsonschema

    err = jsonschema.exceptions.best_match([err]) if err.context else err
    key = ".".join(str(p) for p in err.absolute_path)
    return f"{key}: {err.message}" if key else err.message


def validate_config(config: dict, schema_dir: Path | None = None) -> dict:
    """Validate ``config`` against ``config.schema.yaml`` in place (defaults filled in).

    Raises :class:`ConfigError` naming the offending key.
    """
    from snakemake.utils import validate

    raw_scan = config.get("scan") if isinstance(config, dict) else None
    n_given = isinstance(raw_scan, dict) and raw_scan.get("n") is not None
    try:
        validate(config, _schema("config.schema.yaml", schema_dir))
    except Exception as exc:
        err = _validation_error(exc)
        if err is None:
            raise
        raise ConfigError(f"invalid config: {_describe(err)}")
    _resolve_scan_geometry(config["scan"], n_given)
    return config


def _resolve_scan_geometry(scan: dict, n_given: bool) -> None:
    """Check the scan geometry; ``scan.roi_side_px`` (when set) becomes ``scan.n`` in place.

    The ROI side must be ``Lf + n*Sf`` of the network (``Geometry.for_roi_side``); a side that
    is not, or one that disagrees with an explicit ``scan.n``, is a :class:`ConfigError`.
    """
    from .geometry import Geometry

    side = scan.get("roi_side_px")
    if side is not None:
        try:
            geo = Geometry.for_roi_side(scan["arch"], int(side), scan["alpha"])
        except ValueError as exc:
            raise ConfigError(f"invalid config: scan.roi_side_px: {exc}")
        if n_given and scan["n"] != geo.n:
            raise ConfigError(
                f"invalid config: scan.n {scan['n']} (ROI side {geo.Lf + scan['n'] * geo.Sf} px) "
                f"and scan.roi_side_px {side} (n = {geo.n}) disagree: give one of them"
            )
        scan["n"] = geo.n
    try:
        Geometry.for_arch(scan["arch"], n=scan["n"], alpha=scan["alpha"])
    except ValueError as exc:
        raise ConfigError(f"invalid config: scan: {exc}")


def is_demo_slide(row: dict) -> bool:
    """True when the row's slide is one the workflow itself writes (rule ``synth_slide``)."""
    sid = row["slide_id"]
    return row["path"] == f"{DEMO_DIR}/{sid}.tif" and row["annotation"] in (
        "",
        f"{DEMO_DIR}/{sid}.xml",
    )


def load_samples(
    sheet_path: str | Path, schema_dir: Path | None = None, base_dir: str | Path = "."
) -> pd.DataFrame:
    """Read and validate the sample sheet; returns it indexed by ``slide_id`` (all columns str).

    Checks: exact columns, each row against ``samples.schema.yaml``, unique IDs, files exist (except
    demo slides, which the workflow writes). Raises :class:`ConfigError` naming the row.
    """
    from snakemake.utils import validate

    sheet_path = Path(sheet_path)
    if not sheet_path.is_file():
        raise ConfigError(f"samples: sample sheet {str(sheet_path)!r} not found")
    try:
        df = pd.read_csv(sheet_path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{sheet_path}: not a readable TSV: {exc}")
    missing = [c for c in SHEET_COLUMNS if c not in df.columns]
    extra = [c for c in df.columns if c not in SHEET_COLUMNS]
    if missing or extra:
        raise ConfigError(
            f"{sheet_path}: columns must be {SHEET_COLUMNS}; missing {missing}, unexpected {extra}"
        )
    if df.empty:
        raise ConfigError(f"{sheet_path}: the sample sheet has no rows")
    df = df[SHEET_COLUMNS].apply(lambda col: col.str.strip())
    base = Path(base_dir)
    schema = _schema("samples.schema.yaml", schema_dir)
    try:
        validate(df, schema)  # one pass over the sheet; rows are re-checked only on failure
        sheet_valid = True
    except Exception as exc:
        if _validation_error(exc) is None:
            raise
        sheet_valid = False
    for i, row in enumerate(df.to_dict("records")):
        where = f"{sheet_path} line {i + 2} (slide_id {row['slide_id']!r})"
        if not sheet_valid:
            try:
                validate(pd.DataFrame([row]), schema)
            except Exception as exc:
                err = _validation_error(exc)
                if err is None:
                    raise
                raise ConfigError(f"{where}: {_describe(err)}")
        if is_demo_slide(row):
            continue
        for col in ("path", "annotation"):
            if row[col] and not (base / row[col]).is_file():
                raise ConfigError(f"{where}: {col} file {row[col]!r} not found")
        if row["label"] == "tumor" and not row["annotation"]:
            raise ConfigError(f"{where}: label is tumor but no annotation is given")
    dups = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dups:
        lines = [str(i + 2) for i in df.index[df["slide_id"].isin(dups)]]
        raise ConfigError(f"{sheet_path}: duplicate slide_id {dups} on lines {', '.join(lines)}")
    return df.set_index("slide_id", drop=False)


def config_checksum(config: dict) -> str:
    """Short SHA-256 of the validated config (sorted JSON), recorded in outputs for provenance."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
