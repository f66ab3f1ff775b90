# Shared set-up: config and sample-sheet validation, the settings of each stage as options, and
# the input functions. Decisions live in the package (wsiscan.dag); this file only wires them.
import time
from pathlib import Path

from snakemake.logging import logger
from wsiscan import dag
from wsiscan.config import (
    check_config_files,
    config_checksum,
    load_samples,
    validate_config,
)
from wsiscan.errors import ConfigError
from wsiscan.faults import failed_slides, failure_record_path

WSISCAN_ENV = "../../envs/wsiscan.yaml"
RUN_START = time.time()

try:
    check_config_files(workflow.configfiles)
    validate_config(config)
    SAMPLES = load_samples(config["samples"])
    nothing = dag.nothing_to_scan(config, SAMPLES["split"])
    if nothing:
        raise ConfigError(nothing)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

CONFIG_CHECKSUM = config_checksum(config)
EVAL = config["evaluate"]


# -- settings: one helper forwards every stage's config keys ----------------------------------------
def stage_context(wildcards):
    """What a stage's settings depend on besides the config: the slide file, the round."""
    context = {}
    if "slide" in wildcards.keys():
        context["slide_path"] = SAMPLES.loc[wildcards.slide, "path"]
    if "round" in wildcards.keys():
        context["round"] = int(wildcards.round)
    return context


def settings(stage):
    """The result settings of `stage` as `wsiscan <stage>` options: a rule parameter, so that
    Snakemake re-runs the job when one of them changes."""

    def options(wildcards):
        return dag.stage_options(config, stage, **stage_context(wildcards))

    return options


def runtime(stage):
    """The run-time settings of `stage` (workers, threads, device, ...) as options: a parameter
    function of `threads`, which Snakemake counts as derived from the job's resources and never
    as a rerun trigger."""

    def options(wildcards, threads):
        return dag.runtime_options(config, stage, threads=threads)

    return options


def provenance(value):
    """A parameter that only records where an output came from (the config's checksum): a
    function of the job's input, which Snakemake counts as derived, so it re-runs nothing.
    """

    def recorded(wildcards, input):
        return value

    return recorded


# -- slides ------------------------------------------------------------------------------------------
def slide_row(wildcards):
    """The sample-sheet row of ``wildcards.slide``."""
    return SAMPLES.loc[wildcards.slide]


def slide_path(wildcards):
    return slide_row(wildcards)["path"]


def scan_slides():
    """Slides that go through the per-slide pipeline: the evaluated split."""
    return SAMPLES.index[SAMPLES["split"] == EVAL["split"]].tolist()


def labelled_slides():
    """Scanned slides with a tumour/normal label: the cohort evaluation."""
    rows = SAMPLES[
        (SAMPLES["split"] == EVAL["split"]) & (SAMPLES["label"] != "unknown")
    ]
    return rows.index.tolist()


def model_file():
    """Checkpoint used for inference: model.checkpoint, else the last training round's."""
    return dag.model_file(config)


def model_check():
    """What check_model writes for the model of model_file(). Every infer job waits for it, so
    that a bad checkpoint fails that one job before any slide's tiles.h5 is removed. ancient(),
    so that a new record (the same model checked again) re-runs no inference."""
    return ancient(dag.model_check_record(config))


# -- failed slides (wsiscan.faults, wsiscan.dag) ---------------------------------------------------
#: Per-slide stages that leave a failure record when they fail.
PER_SLIDE_STAGES = ("tissue_mask", "roi_grid", "infer", "stitch", "detect")


def failure_record(wildcards):
    """``results/{slide}/FAILED.json``: written by a failing per-slide stage, removed on success."""
    return str(failure_record_path("results", wildcards.slide))


def slide_inputs(sid):
    """The slide file and annotation of ``sid`` (a newer one makes its failure record stale)."""
    row = SAMPLES.loc[sid]
    return [p for p in (row["path"], row["annotation"]) if p]


def failed_before(slides):
    """``{slide: record}`` for slides whose failure record is newer than their input files."""
    return failed_slides("results", {sid: slide_inputs(sid) for sid in slides})


def final_outputs():
    """Default targets: per-slide lesions of the scanned split and the cohort metrics; for a
    slide whose job failed before, also the output of the stage that failed (its rule's first
    output), so that the stage is retried even where older files downstream of it still exist.
    A sheet with no slide to scan gets the model (the training rounds) instead.
    """
    out = expand("results/{slide}/lesions.csv", slide=scan_slides())
    stage_outputs = {s: str(getattr(rules, s).output[0]) for s in PER_SLIDE_STAGES}
    out += dag.retry_targets(failed_before(scan_slides()), stage_outputs)
    if labelled_slides():
        out.append("results/cohort/metrics.json")
    # no slide to scan (and model.checkpoint unset: see dag.nothing_to_scan): train only
    if not out:
        logger.info(
            f"wsiscan: no slide of split {EVAL['split']!r} to scan: building the model only "
            f"({model_file()})"
        )
        out.append(model_file())
    return out


def evaluated_slides():
    """Slides the evaluation reads: all labelled ones; with evaluate.allow_missing, without the
    slides that failed before (metrics.json lists them under "missing")."""
    slides = labelled_slides()
    if EVAL["allow_missing"]:
        failed = failed_before(slides)
        slides = [sid for sid in slides if sid not in failed]
    return slides


onerror:
    text = ""
    for path in log or []:
        try:
            text += Path(path).read_text(errors="replace")
        except OSError:
            pass
    message = dag.failure_report(
        failed_before(SAMPLES.index),
        labelled_slides(),
        EVAL["allow_missing"],
        dag.failed_jobs(text, since=RUN_START),
    )
    if message:
        logger.error(message)
