"""``wsiscan <stage>``: the command line of every stage, built from one table.

Each stage of :data:`STAGES` names its module and its files; its settings are the fields of its
parameter record (:data:`wsiscan.params.STAGE_PARAMS`), added as options by
:func:`add_settings` with the record's defaults and help. One dispatcher builds the record from
the options and calls the stage function of the same name with its files and the record. The
stage, the Snakemake rule, the function, the log folder and the failure record share one name.

Errors meant for the user (:class:`~wsiscan.errors.WsiscanError`) print one line and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .allocator import TORCH_STAGES, active_allocator, malloc_tuning_applies, restart_environment
from .errors import ConfigError, WsiscanError
from .faults import clear_failure_record, write_failure_record
from .fileio import OutputWriteError
from .params import NULL_TOKEN, STAGE_PARAMS, Setting, StageParams, option_name
from .slide import check_slide_id

log = logging.getLogger("wsiscan")


# -- the stage table -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arg:
    """One argument of a stage function besides its record: a file (``Path``) unless ``type``
    says otherwise. ``many``: one or more values; ``optional``: may be left out (then
    ``default``)."""

    name: str
    help: str
    many: bool = False
    optional: bool = False
    type: Callable[[str], Any] = Path
    choices: tuple[str, ...] | None = None
    default: Any = None

    def add_to(self, parser: argparse.ArgumentParser | Any) -> None:
        kwargs: dict[str, Any] = {"type": self.type, "help": self.help, "dest": self.name}
        if self.many:
            kwargs["nargs"] = "*" if self.optional else "+"
        if self.choices:
            kwargs["choices"] = self.choices
        if self.optional:
            kwargs["default"] = self.default
        else:
            kwargs["required"] = True
        parser.add_argument(option_name(self.name), **kwargs)


@dataclass(frozen=True)
class Stage:
    """A stage: its module (the function there has the stage's name), what it does, its
    arguments; ``per_slide`` stages take ``--slide-id``."""

    name: str
    module: str
    help: str
    args: tuple[Arg, ...]
    per_slide: bool = True

    @property
    def params(self) -> type[StageParams]:
        return STAGE_PARAMS[self.name]

    def function(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(f"wsiscan.{self.module}"), self.name)


def _many(name: str, help: str, optional: bool = False) -> Arg:
    return Arg(name, help, many=True, optional=optional, default=())


_ROUND = Arg("round_index", "training round k >= 1", type=int)

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("synth_slide", "synth", "Write one synthetic H&E-like pyramidal TIFF and its ASAP XML.", (
            Arg("label", "slide label", type=str, choices=("tumor", "normal")),
            Arg("centre", "demo centre of the slide's stain and scanner (A, B or C; empty: none)",
                type=str, optional=True, default=""),
            Arg("out_slide", "pyramidal .tif to write"),
            Arg("out_xml", "ASAP XML of the tumour polygons to write"),
        )),
        Stage("tissue_mask", "tissue", "Otsu tissue mask (PNG + metadata) and its QC picture.", (
            Arg("slide", "whole-slide image"),
            Arg("out_mask", "tissue.png to write (0/255, metadata in text chunks)"),
            Arg("out_qc", "QC picture to write: the mask outline on the thumbnail"),
        )),
        Stage("roi_grid", "grid", "ROI grid of the network's geometry over the tissue: rois.h5.", (
            Arg("slide", "whole-slide image"),
            Arg("mask", "tissue.png of the tissue_mask stage"),
            Arg("out_rois", "rois.h5 to write"),
        )),
        Stage("init_model", "model", "Write an untrained ScanNet checkpoint.", (
            Arg("imagenet_weights", "torchvision VGG16(-BN) state dict for the trunk",
                optional=True),
            Arg("out_model", "model.pt to write"),
        ), per_slide=False),
        Stage("check_model", "model", "Check the checkpoint inference will use: it loads, holds "
              "finite weights and scans the configured geometry.", (
            Arg("model", "model checkpoint (model.pt) to check"),
            Arg("out_record", "record (JSON) to write: the model's checksum, width and geometry"),
        ), per_slide=False),
        Stage("infer", "infer", "Dense ScanNet tiles for every block of rois.h5: tiles.h5.", (
            Arg("slide", "whole-slide image"),
            Arg("rois", "rois.h5 of the roi_grid stage"),
            Arg("model", "model checkpoint (model.pt)"),
            Arg("out_tiles", "tiles.h5 to write"),
        )),
        Stage("stitch", "stitch", "Dense tiles into the slide probability map: probmap.h5.", (
            Arg("slide", "whole-slide image (for the QC thumbnail of --out-qc)", optional=True),
            Arg("tiles", "tiles.h5 of the infer stage"),
            Arg("mask", "tissue.png of the tissue_mask stage (confines the map to tissue)",
                optional=True),
            Arg("out_probmap", "probmap.h5 to write"),
            Arg("out_qc", "QC heat map PNG to write (the workflow draws its QC picture in "
                "detect)", optional=True),
        )),
        Stage("detect", "detect", "Lesion points, slide score and region exports of a map.", (
            Arg("probmap", "probmap.h5 of the stitch stage"),
            Arg("out_lesions", "lesions.csv to write (confidence,x,y at level 0)"),
            Arg("out_score", "score.json to write"),
            Arg("out_geojson", "regions and lesion candidates as QuPath GeoJSON to write"),
            Arg("out_xml", "regions as ASAP XML to write"),
            Arg("out_outlines", "outlines of the map at detect.outline_levels (QuPath GeoJSON) "
                "to write", optional=True),
            Arg("out_overlay", "the map as a pyramidal TIFF for slide viewers to write",
                optional=True),
            Arg("out_qc", "QC picture to write (needs --slide)", optional=True),
            Arg("slide", "whole-slide image (the QC thumbnail)", optional=True),
            Arg("mask", "tissue.png (the confinement outline of the QC picture)", optional=True),
            Arg("annotation", "ground-truth annotation (outlined in the QC picture)",
                optional=True),
        )),
        Stage("summarise", "summarise", "The cohort summary for the pathologist: summary.tsv, "
              "patients.tsv, staging.json.", (
            Arg("sheet", "sample sheet (slides.tsv)"),
            Arg("results_dir", "folder of the <slide_id>/ results"),
            Arg("out_summary", "summary.tsv to write"),
            Arg("out_patients", "patients.tsv to write"),
            Arg("out_staging", "staging.json to write"),
            Arg("truth", "true categories and pN stages, CSV in the Camelyon17 layout",
                optional=True),
            Arg("failed", "slides to list as failed (default: those whose FAILED.json is newer "
                "than their files)", many=True, optional=True, type=str),
        ), per_slide=False),
        Stage("evaluate", "evaluate", "Camelyon16 FROC and slide AUC of a cohort.", (
            Arg("sheet", "sample sheet (slides.tsv)"),
            Arg("model", "checkpoint that scored the slides (its SHA-256 is recorded)",
                optional=True),
            Arg("results_dir", "folder of the <slide_id>/ results"),
            Arg("out_dir", "folder to write metrics.json, the curves and the submission to"),
            Arg("config_checksum", "checksum of the workflow config (provenance)", type=str,
                optional=True),
            Arg("failed", "with --allow-missing: slides to list as failed (default: those whose "
                "FAILED.json is newer than their files)", many=True, optional=True, type=str),
            Arg("submission", "folder of Camelyon16 <slide_id>.csv files (confidence,X,Y at "
                "level 0; header optional; 0 bytes: no detection) evaluated instead of "
                "results/<slide_id>/lesions.csv", optional=True),
        ), per_slide=False),
        Stage("round_summary", "evaluate", "The cohort figures of every training round: rounds.tsv.", (
            _many("metrics", "metrics.json of each round's evaluation"),
            Arg("out_rounds", "rounds.tsv to write"),
        ), per_slide=False),
        Stage("train_patches", "patches", "Draw the base training patch centres: patches.h5.", (
            Arg("sheet", "sample sheet: its train split is drawn from"),
            _many("masks", "tissue.png of every training slide"),
            Arg("out_patches", "patches.h5 to write"),
        ), per_slide=False),
        Stage("train_round", "train", "Train one round of ScanNet on prefetched patches.", (
            _ROUND,
            Arg("patches", "patches.h5 of the train_patches stage"),
            _many("hard_negatives", "hard_negatives.h5 of the earlier rounds", optional=True),
            Arg("init_model", "model.pt to fine-tune (the previous round's)", optional=True),
            Arg("imagenet_weights", "torchvision VGG16(-BN) state dict for the trunk",
                optional=True),
            Arg("out_model", "model.pt to write"),
            Arg("out_metrics", "metrics.json to write"),
            Arg("out_loss_png", "loss curve PNG to write"),
            Arg("checkpoint", "resumable state (default: checkpoint.pt beside the model)",
                optional=True),
        ), per_slide=False),
        Stage("mine_negatives", "mining", "False positives of a round's model as hard negatives.", (
            _ROUND,
            Arg("patches", "patches.h5 (its slide table)"),
            Arg("model", "the round's model.pt"),
            _many("rois", "rois.h5 of every training slide"),
            Arg("out_hard_negatives", "hard_negatives.h5 to write"),
        ), per_slide=False),
    )
}  # fmt: skip


# -- settings as options ---------------------------------------------------------------------------
def _value_type(spec: Setting, kind: type) -> Callable[[str], Any]:
    base: Callable[[str], Any] = {int: int, float: float}.get(kind, str)
    if not spec.nullable:
        return base

    def nullable(text: str) -> Any:
        return None if text.lower() in (NULL_TOKEN, "null") else base(text)

    nullable.__name__ = base.__name__
    return nullable


def add_settings(parser: argparse.ArgumentParser, record: type[StageParams]) -> None:
    """One option per field of ``record``: its default, its help and its config key."""
    group = parser.add_argument_group(
        "settings", "config keys (defaults: wsiscan.params; see config/README.md)"
    )
    for name, spec in record.settings().items():
        text = spec.description.replace("%", "%%")
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": spec.default,
            "help": f"{text}; config {spec.key}; default %(default)s",
        }
        if spec.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.kind in (list, tuple):
            kwargs.update(type=_value_type(spec, spec.item or str), nargs=spec.length or "*")
        else:
            kwargs["type"] = _value_type(spec, spec.kind)
            if spec.choices is not None:
                kwargs["choices"] = spec.choices
        if spec.nullable:
            kwargs["help"] += f" ({NULL_TOKEN}: none)"
        group.add_argument(option_name(name), **kwargs)


def _add_stage(sub: argparse._SubParsersAction, stage: Stage) -> None:
    p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
    files = p.add_argument_group("files and arguments")
    if stage.per_slide:
        files.add_argument("--slide-id", required=True, help="slide ID ([A-Za-z0-9._-]+)")
    for arg in stage.args:
        arg.add_to(files)
    add_settings(p, stage.params)
    p.set_defaults(run=lambda a, stage=stage: run_stage(stage, a))


def run_stage(stage: Stage, args: argparse.Namespace) -> Any:
    """Build ``stage``'s record from the parsed options and call its function."""
    settings = {name: getattr(args, name) for name in stage.params.settings()}
    record = stage.params(**settings)
    kwargs = {arg.name: getattr(args, arg.name) for arg in stage.args}
    if stage.per_slide:
        kwargs["slide_id"] = check_slide_id(args.slide_id)
    return stage.function()(params=record, **kwargs)


# -- tools (not stages) ----------------------------------------------------------------------------
def _add_tools(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sheet",
        help="Build the sample sheet (slides.tsv) of a Camelyon16 download (--root; centre RUMC/UMCU "
        "for the training slides, from their numbers) or of a folder of slides of a new cohort, "
        "labels unknown (--folder).",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--root", type=Path, help="Camelyon16 folder holding training/, testing/")
    where.add_argument("--folder", type=Path, help="folder of slide files (svs, tif, ndpi, mrxs, "
                       "...): one row each, label unknown, no annotation")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="slides.tsv to write")
    p.add_argument("--reference", type=Path, default=None, help="--root: test labels CSV "
                   "(default: <root>/testing/reference.csv)")  # fmt: skip
    p.add_argument("--split", choices=("train", "test"), default="test", help="--folder: the "
                   "split of every slide (default test, the one evaluate.split scans)")  # fmt: skip
    p.add_argument("--patient-pattern", default=None, help="--folder: regular expression whose "
                   "first group in a file name is its patient (a patient column for pN stages), "
                   "e.g. '(patient_[0-9]+)'")  # fmt: skip
    p.add_argument("--recursive", action="store_true", help="--folder: its sub-folders too")
    p.set_defaults(run=_run_sheet)

    p = sub.add_parser(
        "install-profile",
        help="Link a Snakemake profile (profiles/<name> of the current folder, else of the clone "
        "wsiscan is installed from) where `snakemake --profile <name>` finds it.",
    )
    p.add_argument("--name", default="slurm", help="profile name (default: slurm)")
    p.add_argument("--source", type=Path, default=None, help="profile folder (default: "
                   "profiles/<name> of the current folder if there is one, else of the clone "
                   "wsiscan is installed from)")  # fmt: skip
    p.add_argument("--dest", type=Path, default=None, help="profile root (default: the user's "
                   "Snakemake config folder, $XDG_CONFIG_HOME/snakemake or ~/.config/snakemake)")  # fmt: skip
    p.add_argument("--copy", action="store_true", help="copy instead of a symbolic link")
    p.add_argument("--force", action="store_true", help="move an existing different profile aside")
    p.set_defaults(run=_run_install_profile)

    p = sub.add_parser(
        "config-docs",
        help="Write the config schema and config/README.md from the settings table.",
    )
    p.add_argument("--check", action="store_true", help="only check that they are current")
    p.set_defaults(run=_run_config_docs)


def _run_sheet(a: argparse.Namespace) -> object:
    from .sheet import build_camelyon16_sheet, build_folder_sheet

    if a.folder is not None:
        df = build_folder_sheet(
            a.folder, a.out, split=a.split, patient_pattern=a.patient_pattern,
            recursive=a.recursive,
        )  # fmt: skip
        print(f"wrote {a.out}: {len(df)} slides, label unknown, split {a.split}")
        return df
    return build_camelyon16_sheet(a.root, a.out, reference_csv=a.reference)


def _run_install_profile(a: argparse.Namespace) -> object:
    from .profiles import default_source, install_profile

    source, origin = (a.source.resolve(), "--source") if a.source else default_source(a.name)
    target = install_profile(a.name, source=source, dest_root=a.dest, copy=a.copy, force=a.force)
    how = "a copy of" if a.copy else "a link to"
    print(f"snakemake --profile {a.name} now uses {target}, {how} {source} ({origin})")
    return target


def _run_config_docs(a: argparse.Namespace) -> object:
    from .config import config_docs

    stale = config_docs(check=a.check)
    if a.check and stale:
        raise ConfigError(f"out of date, run `wsiscan config-docs`: {[str(p) for p in stale]}")
    for path in stale:
        print(f"wrote {path}")
    return stale


# -- parser and entry point ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``wsiscan`` argument parser: one subcommand per stage, then the tools."""
    parser = argparse.ArgumentParser(prog="wsiscan", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"wsiscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--failure-record",
        type=Path,
        default=None,
        metavar="JSON",
        help="on failure write {stage, cause} here (atomically); on success remove it "
        "(the workflow passes results/<slide>/FAILED.json)",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for stage in STAGES.values():
        _add_stage(sub, stage)
    _add_tools(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsiscan`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    slide_id = getattr(args, "slide_id", None)
    try:
        if argv is None and malloc_tuning_applies(args.stage, os.environ):
            # the same command once more, same PID, with the allocator settings in its environment
            os.execve(  # noqa: S606 (an argument list, no shell)
                sys.executable,
                [sys.executable, "-m", "wsiscan", *sys.argv[1:]],
                {**os.environ, **restart_environment(args.stage, os.environ)},
            )
        if args.stage in TORCH_STAGES:
            log.info("allocator: %s", active_allocator())
        args.run(args)
    except WsiscanError as exc:
        _record_failure(args, exc, str(exc))
        print(f"wsiscan {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, file too large, I/O error: the cause, not a traceback
        log.debug("traceback", exc_info=True)
        where = f"slide {slide_id!r}: " if slide_id else ""
        if isinstance(exc, OutputWriteError):
            where += "cannot write an output: "
        _record_failure(args, exc, f"{where}{exc}")
        print(f"wsiscan {args.stage}: error: {where}{exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: keep the traceback, but record the failure
        _record_failure(args, exc, f"{type(exc).__name__}: {exc}")
        raise
    if args.failure_record is not None and clear_failure_record(args.failure_record):
        log.info("removed the failure record %s of an earlier run", args.failure_record)
    if args.stage in STAGES:  # the job's log ends with this line (or with the error line)
        print(f"wsiscan {args.stage}: done", file=sys.stderr)
    return 0


def _record_failure(args: argparse.Namespace, exc: BaseException, cause: str) -> None:
    """Write ``--failure-record`` (if given); a failure to write it is logged, not raised."""
    if args.failure_record is None:
        return
    try:
        write_failure_record(
            args.failure_record,
            stage=args.stage,
            slide_id=getattr(args, "slide_id", None),
            cause=cause,
            error=type(exc).__name__,
        )
    except OSError as write_exc:
        log.warning("cannot write the failure record %s: %s", args.failure_record, write_exc)


if __name__ == "__main__":
    sys.exit(main())
