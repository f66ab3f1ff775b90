"""The config file and the sample sheet: schema, validation, reference page, checksum.

The config schema (``workflow/schemas/config.schema.yaml``) and the key reference in
``config/README.md`` (the part between its two ``settings`` markers) are generated from
:data:`wsiscan.params.SETTINGS` by ``wsiscan config-docs`` and checked by the tests to be current;
edit the settings table, never these. The rest of ``config/README.md`` (how to configure and run
the workflow: the page the Snakemake workflow catalog shows) is written by hand.

Validation (:func:`validate_config`) runs the schema through ``snakemake.utils.validate`` (which
fills in the defaults), then checks every value against its setting (finite numbers, limits) and
what a schema cannot express (the ROI side). The sample sheet (:func:`load_samples`) is checked
against ``samples.schema.yaml`` plus unique IDs and existing files. Every error names the config
key or the sheet line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import ConfigError
from .params import RENAMED, SECTIONS, SETTINGS, STAGE_PARAMS, WIRING, Setting, config_value

REPO_DIR = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO_DIR / "workflow" / "schemas"
CONFIG_SCHEMA = SCHEMA_DIR / "config.schema.yaml"
CONFIG_REFERENCE = REPO_DIR / "config" / "README.md"
SHEET_COLUMNS = ["slide_id", "path", "annotation", "label", "split"]


@dataclass(frozen=True)
class OptionalColumn:
    """An optional column of the sample sheet: what it means and the values it admits (a cell may
    be empty unless ``required``; ``pattern`` or ``choices`` check the others)."""

    help: str
    pattern: str | None = None
    choices: tuple[str, ...] | None = None

    def check(self, value: str) -> str | None:
        """The reason ``value`` does not fit, or None."""
        if value == "":
            return None
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            return f"{value!r} does not match {self.pattern}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {list(self.choices)} (or empty), got {value!r}"
        return None


#: Optional sheet columns, by name: a sheet may hold any of them after the required ones.
OPTIONAL_COLUMNS: dict[str, OptionalColumn] = {
    "patient": OptionalColumn(
        "the patient the slide (one lymph node) belongs to: patients.tsv gives each patient's pN "
        "stage from its slides",
        pattern=r"[A-Za-z0-9._-]+",
    ),
    "true_category": OptionalColumn(
        "the slide's true size category, to evaluate the predicted ones (and the pN stages)",
        choices=("negative", "itc", "micro", "macro"),
    ),
    "centre": OptionalColumn(
        "the centre (lab, scanner) the slide comes from: the evaluation reports each centre's "
        "metrics too; demo slides take their stain and scanner from it",
        pattern=r"[A-Za-z0-9._-]+",
    ),
}
DEMO_DIR = "data/demo"
GENERATED = "Generated from wsiscan.params.SETTINGS by `wsiscan config-docs`: do not edit."
_BEGIN = "<!-- settings:begin"
REFERENCE_BEGIN = f"{_BEGIN}. {GENERATED} -->"
REFERENCE_END = "<!-- settings:end -->"


# -- the schema ------------------------------------------------------------------------------------
_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}


def setting_schema(spec: Setting) -> dict[str, Any]:
    """The JSON schema of one setting (type, limits, default, description)."""
    node: dict[str, Any] = {}
    if spec.kind in (list, tuple):
        node["type"] = "array"
        node["items"] = _limits({"type": _JSON_TYPES[spec.item or str]}, spec)
        if spec.length is not None:
            node["minItems"] = node["maxItems"] = spec.length
    else:
        node = _limits({"type": _JSON_TYPES[spec.kind]}, spec)
        if spec.choices is not None:
            node = {"enum": list(spec.choices)}
    if spec.nullable:
        if "enum" in node:
            node["enum"].append(None)
        else:
            node["type"] = [node["type"], "null"]
    if not spec.required:
        node["default"] = list(spec.default) if isinstance(spec.default, tuple) else spec.default
    node["description"] = spec.description
    return node


def _limits(node: dict[str, Any], spec: Setting) -> dict[str, Any]:
    if spec.minimum is not None:
        open_low = spec.exclusive in ("min", "both")
        node["exclusiveMinimum" if open_low else "minimum"] = spec.minimum
    if spec.maximum is not None:
        open_high = spec.exclusive in ("max", "both")
        node["exclusiveMaximum" if open_high else "maximum"] = spec.maximum
    if spec.pattern is not None:
        node["pattern"] = spec.pattern
    return node


def config_schema() -> dict[str, Any]:
    """The JSON schema of the config file, built from :data:`SETTINGS`."""
    root: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "description": SECTIONS[""],
        "type": "object",
        "additionalProperties": False,
        "required": [s.key for s in SETTINGS.values() if s.required],
        "properties": {},
    }
    for spec in SETTINGS.values():
        node = root
        path = ""
        for part in spec.section.split(".") if spec.section else ():
            path = f"{path}.{part}" if path else part
            node = node["properties"].setdefault(
                part,
                {
                    "type": "object",
                    "additionalProperties": False,
                    "default": {},
                    "description": SECTIONS[path],
                    "properties": {},
                },
            )
        node["properties"][spec.name] = setting_schema(spec)
    return root


def schema_text() -> str:
    """``config.schema.yaml`` as written by ``wsiscan config-docs``."""
    import yaml

    body = yaml.safe_dump(config_schema(), sort_keys=False, width=100, allow_unicode=True)
    return f"# {GENERATED}\n{body}"


# -- the reference page ----------------------------------------------------------------------------
def readers(key: str) -> str:
    """Which stages read ``key`` (or what the workflow does with it), for the reference page."""
    stages = [
        s for s, cls in STAGE_PARAMS.items() if any(v.key == key for v in cls.settings().values())
    ]
    if SETTINGS[key].runtime:
        return ", ".join(f"`{s}`" for s in stages) + " (run-time: never re-runs)"
    if stages:
        return ", ".join(f"`{s}`" for s in stages)
    return WIRING[key]


def _value(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value}`"


def reference_text() -> str:
    """The generated part of ``config/README.md``: every config key with its default, meaning and
    the stages that read it (between :data:`REFERENCE_BEGIN` and :data:`REFERENCE_END`)."""
    lines = [
        REFERENCE_BEGIN,
        "",
        "## Every key",
        "",
        "Every key of `config/config.yaml`, with its default (what a config that leaves the key",
        "out gets), its meaning and unit, and the stages that read it. The config is validated",
        "against `workflow/schemas/config.schema.yaml` before any job runs; an error names the",
        "key. Editing a key re-runs the stages that read it and what depends on them; run-time",
        "keys (workers, threads, batch sizes of inference, devices) change no output and never",
        "re-run a job. `config/config.yaml` is the embedded demo; `config/camelyon16.yaml` is a",
        "starting point for Camelyon16.",
        "",
    ]
    sections: dict[str, list[Setting]] = {}
    for spec in SETTINGS.values():
        sections.setdefault(spec.section, []).append(spec)
    for section, specs in sections.items():
        title = f"`{section}`" if section else "Top level"
        lines += [
            f"### {title}",
            "",
            SECTIONS[section][0].upper() + SECTIONS[section][1:] + ".",
            "",
        ]
        lines += ["| key | default | meaning | read by |", "|---|---|---|---|"]
        for spec in specs:
            default = "(required)" if spec.required else _value(spec.default)
            meaning = spec.help + (f" ({spec.unit})" if spec.unit else "")
            lines.append(f"| `{spec.name}` | {default} | {meaning} | {readers(spec.key)} |")
        lines.append("")
    renamed = ", ".join(f"`{old}` → `{new}`" for old, new in RENAMED.items())
    lines += [
        "Keys renamed since version 0.1 (an old config names them in its error):",
        renamed,
        "",
        REFERENCE_END,
    ]
    return "\n".join(lines)


def reference_page(page: str) -> str:
    """``page`` (the text of ``config/README.md``) with its generated part replaced by
    :func:`reference_text`; the hand-written text around the markers stays as it is."""
    begin, end = page.find(_BEGIN), page.find(REFERENCE_END)
    if begin < 0 or end < begin:
        raise ConfigError(
            f"{CONFIG_REFERENCE}: the markers {_BEGIN!r} ... {REFERENCE_END!r} around the "
            "generated key reference are missing"
        )
    return page[:begin] + reference_text() + page[end + len(REFERENCE_END) :]


def config_docs(check: bool = False) -> list[Path]:
    """Write the schema and the reference page's generated part (``check``: only compare);
    returns the stale files."""
    page = CONFIG_REFERENCE.read_text() if CONFIG_REFERENCE.is_file() else ""
    stale = []
    for path, text in ((CONFIG_SCHEMA, schema_text()), (CONFIG_REFERENCE, reference_page(page))):
        if not path.is_file() or path.read_text() != text:
            stale.append(path)
            if not check:
                from .fileio import write_text

                write_text(path, text)
    return stale


# -- validation ------------------------------------------------------------------------------------
def check_config_files(paths: Iterable[str | Path]) -> None:
    """:class:`ConfigError` naming the file, the key and both lines when a config file sets one
    key twice (YAML loaders, Snakemake's too, silently keep the last value).

    Snakemake loads the config files itself; the workflow passes ``workflow.configfiles`` here.
    Files Snakemake cannot read or parse are left to its own error.
    """
    import yaml

    def walk(node: yaml.Node, where: tuple[str, ...], path: Path) -> None:
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, where, path)
            return
        if not isinstance(node, yaml.MappingNode):
            return
        seen: dict[str, int] = {}
        for key_node, value in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"invalid config: {path}: key {'.'.join((*where, key))!r} is set twice "
                    f"(lines {seen[key]} and {line}); YAML would keep only the last value"
                )
            seen[key] = line
            walk(value, (*where, key), path)

    for path in map(Path, paths):
        try:
            root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if root is not None:
            walk(root, (), path)


def _schema(name: str, schema: str | Path | None) -> str:
    """The schema file to validate against: ``schema`` (the workflow passes its own, found
    relative to its rule files) or the one beside this package's source (``workflow/schemas/``
    of its clone: stages and tests run outside Snakemake)."""
    return str(schema if schema is not None else SCHEMA_DIR / name)


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


def _renamed_keys(config: Mapping[str, Any]) -> list[str]:
    found = []
    for old, new in RENAMED.items():
        node: Any = config
        for part in old.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            found.append(f"{old} is now {new}")
    return found


def validate_config(config: dict, schema: str | Path | None = None) -> dict:
    """Validate ``config`` in place (defaults filled in) against ``schema`` (default: the
    clone's ``config.schema.yaml``); returns it.

    Raises :class:`ConfigError` naming the offending key.
    """
    from snakemake.utils import validate

    if not isinstance(config, dict):
        raise ConfigError(f"invalid config: expected a mapping of sections, got {type(config)}")
    renamed = _renamed_keys(config)
    if renamed:
        raise ConfigError(f"invalid config: renamed key(s): {'; '.join(renamed)}")
    raw_scan = config.get("scan")
    n_given = isinstance(raw_scan, dict) and raw_scan.get("n") is not None
    try:
        validate(config, _schema("config.schema.yaml", schema))
    except Exception as exc:
        err = _validation_error(exc)
        if err is None:
            raise
        raise ConfigError(f"invalid config: {_describe(err)}")
    for key, spec in SETTINGS.items():
        try:
            spec.check(config_value(config, key))
        except ValueError as exc:
            raise ConfigError(f"invalid config: {key}: {exc}") from None
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


def config_checksum(config: Mapping[str, Any]) -> str:
    """Short SHA-256 of the config's result settings (run-time settings left out): provenance."""
    from .fileio import sha256_json

    values = {k: config_value(config, k) for k, s in SETTINGS.items() if not s.runtime}
    return sha256_json(values, 16)


# -- the sample sheet ------------------------------------------------------------------------------
def is_demo_slide(row: Mapping[str, str]) -> bool:
    """True when the row's slide is one the workflow itself writes (rule ``synth_slide``)."""
    sid = row["slide_id"]
    return row["path"] == f"{DEMO_DIR}/{sid}.tif" and row["annotation"] in (
        "",
        f"{DEMO_DIR}/{sid}.xml",
    )


def read_sheet_rows(sheet_path: Path) -> tuple[pd.DataFrame, list[int]]:
    """The sheet's rows as strings, and the file line number of each row.

    Tab-separated, read literally: ``#`` and quotes inside a field are data (a path may hold
    them). Blank lines and lines whose first character is ``#`` (comments; a slide ID never
    starts with ``#``) are skipped.
    """
    import csv
    import io

    try:
        text = sheet_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{sheet_path}: not a readable TSV: {exc}")
    kept, numbers = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        kept.append(line)
        numbers.append(lineno)
    if not kept:
        raise ConfigError(f"{sheet_path}: the sample sheet is empty")
    try:
        df = pd.read_csv(
            io.StringIO("\n".join(kept) + "\n"),
            sep="\t",
            dtype=str,
            keep_default_na=False,
            quoting=csv.QUOTE_NONE,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ConfigError(f"{sheet_path}: not a readable TSV: {exc}")
    return df, numbers[1:]


def load_samples(
    sheet_path: str | Path,
    schema: str | Path | None = None,
    base_dir: str | Path = ".",
    check_files: bool = True,
) -> pd.DataFrame:
    """Read and validate the sample sheet; returns it indexed by ``slide_id`` (all columns str).

    Checks: exact columns, each row against ``schema`` (default: the clone's
    ``samples.schema.yaml``) and :func:`wsiscan.slide.check_slide_id` (no leading ``-``, no
    reserved name), unique IDs, tumour rows with an annotation and (``check_files``) existing
    regular files, except demo slides, which the workflow writes. Paths are relative to
    ``base_dir``. Raises :class:`ConfigError` naming the line.
    """
    from snakemake.utils import validate

    from .errors import SlideIdError
    from .slide import check_slide_id, not_a_file

    sheet_path = Path(sheet_path)
    if not sheet_path.is_file():
        raise ConfigError(f"samples: sample sheet {str(sheet_path)!r} not found")
    df, lines = read_sheet_rows(sheet_path)
    missing = [c for c in SHEET_COLUMNS if c not in df.columns]
    extra = [c for c in df.columns if c not in SHEET_COLUMNS and c not in OPTIONAL_COLUMNS]
    if missing or extra:
        raise ConfigError(
            f"{sheet_path}: columns must be {SHEET_COLUMNS} (optional: {list(OPTIONAL_COLUMNS)}); "
            f"missing {missing}, unexpected {extra}"
        )
    if df.empty:
        raise ConfigError(f"{sheet_path}: the sample sheet has no rows")
    optional = [c for c in OPTIONAL_COLUMNS if c in df.columns]
    df = df[SHEET_COLUMNS + optional].apply(lambda col: col.str.strip())
    _check_optional_columns(df, optional, sheet_path, lines)
    base = Path(base_dir)
    schema = _schema("samples.schema.yaml", schema)
    try:
        validate(df[SHEET_COLUMNS], schema)  # one pass; rows are re-checked only on failure
        sheet_valid = True
    except Exception as exc:
        if _validation_error(exc) is None:
            raise
        sheet_valid = False
    for i, row in enumerate(df.to_dict("records")):
        where = f"{sheet_path} line {lines[i]} (slide_id {row['slide_id']!r})"
        if not sheet_valid:
            try:
                validate(pd.DataFrame([row])[SHEET_COLUMNS], schema)
            except Exception as exc:
                err = _validation_error(exc)
                if err is None:
                    raise
                raise ConfigError(f"{where}: {_describe(err)}")
        try:
            check_slide_id(row["slide_id"])
        except SlideIdError as exc:
            raise ConfigError(f"{where}: {exc}")
        if row["label"] == "tumor" and not row["annotation"]:
            raise ConfigError(f"{where}: label is tumor but no annotation is given")
        if not check_files or is_demo_slide(row):
            continue
        for col in ("path", "annotation"):
            problem = not_a_file(base / row[col]) if row[col] else None
            if problem == "file not found":
                raise ConfigError(f"{where}: {col} file {row[col]!r} not found")
            if problem:
                raise ConfigError(f"{where}: {col} {row[col]!r} {problem}")
    dups = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dups:
        where = [str(lines[i]) for i in range(len(df)) if df["slide_id"].iloc[i] in dups]
        raise ConfigError(f"{sheet_path}: duplicate slide_id {dups} on lines {', '.join(where)}")
    return df.set_index("slide_id", drop=False)


def _check_optional_columns(
    df: pd.DataFrame, columns: list[str], sheet_path: Path, lines: list[int]
) -> None:
    """:class:`ConfigError` naming the file line (``lines[i]``, from :func:`read_sheet_rows`) of
    the first value an optional column refuses."""
    for col in columns:
        spec = OPTIONAL_COLUMNS[col]
        for i, value in enumerate(df[col].tolist()):
            reason = spec.check(value)
            if reason:
                sid = df["slide_id"].iloc[i]
                where = f"{sheet_path} line {lines[i]} (slide_id {sid!r})"
                raise ConfigError(f"{where}: {col}: {reason}")
