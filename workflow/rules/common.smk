# Shared set-up: config and sample-sheet validation, the settings of each stage as options, and
# the input functions. Decisions live in the package (wsiscan.dag); this file only wires them.
import os
import sys
import time
from pathlib import Path

from snakemake.logging import logger
from snakemake_interface_executor_plugins.settings import DeploymentMethod


# -- the package: this workflow's own copy ---------------------------------------------------------
# Paths here are relative to this file (workflow.current_basedir, workflow.source_path), never to
# workflow.basedir, which is the calling workflow's folder when wsiscan is used as a module.
def package_source():
    """``scripts/`` of the clone this file lies in (the package that belongs to these rules), or
    None when the workflow is not a local folder (a module given as ``github(...)``)."""
    src = Path(str(workflow.current_basedir)).parents[1] / "scripts"
    return src if (src / "wsiscan" / "__init__.py").is_file() else None


WSISCAN_SRC = package_source()
if WSISCAN_SRC is not None:
    sys.path.insert(0, str(WSISCAN_SRC))
try:
    from wsiscan import dag
    from wsiscan.config import (
        check_config_files,
        config_checksum,
        load_samples,
        validate_config,
    )
    from wsiscan.errors import ConfigError
    from wsiscan.faults import failed_slides
except ImportError as exc:
    raise WorkflowError(
        f"wsiscan: cannot import the workflow's Python package ({exc}). Use the workflow from a "
        "clone (its scripts/ folder holds the package), or install the package into the "
        "environment that runs Snakemake"
    ) from None


def wsiscan_environment():
    """What the rules' commands (:func:`wsiscan`) read: the interpreter and a PYTHONPATH that puts
    this clone's ``scripts/`` first, so that jobs run the package of these rules, also in a
    module used from elsewhere and in the conda environment (which holds only the package's
    dependencies). Without conda the interpreter is the one running Snakemake (a SLURM job runs
    that one again on its node). Environment variables, not text of the commands: moving the clone
    or the venv changes no rule's code, so it re-runs no job."""
    conda_jobs = (
        DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    )
    path = [str(WSISCAN_SRC)] if WSISCAN_SRC is not None else []
    user_path = os.environ.get("PYTHONPATH")  # Snakemake drops it for conda jobs
    if user_path and not conda_jobs:
        path.append(user_path)
    return {
        "WSISCAN_PYTHON": "python" if conda_jobs else sys.executable,
        "WSISCAN_PYTHONPATH": os.pathsep.join(path),
    }


os.environ.update(wsiscan_environment())


def wsiscan(arguments, failure_record=None):
    """A rule's shell command: ``python -m wsiscan <arguments>`` as set by
    :func:`wsiscan_environment`. ``failure_record``: for a per-slide stage, the name of the
    rule's output beside which its failure record FAILED.json goes (results/{slide}/, or
    results/rounds/round{k}/{slide}/ for an earlier round's scan). Command text, not a rule
    parameter: the report lists every parameter of the job that made a result as its "Job
    parameters", and this path is the workflow's own business.
    """
    record = ""
    if failure_record:
        record = (
            f'--failure-record "$(dirname {{output.{failure_record}:q}})/FAILED.json" '
        )
    return f'PYTHONPATH="$WSISCAN_PYTHONPATH" "$WSISCAN_PYTHON" -m wsiscan {record}{arguments}'


WSISCAN_ENV = "../envs/wsiscan.yaml"
RUN_START = time.time()

try:
    SCHEMAS = {
        name: workflow.source_path(f"../schemas/{name}.schema.yaml")
        for name in ("config", "samples")
    }
    check_config_files(workflow.configfiles)
    validate_config(config, schema=SCHEMAS["config"])
    SAMPLES = load_samples(config["samples"], schema=SCHEMAS["samples"])
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


def memory_mb(stage):
    """`mem_mb` of a torch stage: wsiscan.memory's request (geometry, width, batch, workers,
    device), computed once, times the retry attempt. A resource: a changed request re-runs
    nothing."""
    first = dag.memory_request_mb(config, stage)

    def mem_mb(wildcards, attempt):
        return first * attempt

    return mem_mb


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
    if scan_slides():
        out.append("results/cohort/summary.tsv")
    if labelled_slides():
        out.append("results/cohort/metrics.json")
        if earlier_rounds():
            out.append("results/cohort/rounds.tsv")
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


def evaluation_failed_args():
    """``--failed`` with the labelled slides the evaluation leaves out (evaluate.allow_missing)."""
    if not EVAL["allow_missing"]:
        return []
    return ["--failed", *sorted(set(labelled_slides()) - set(evaluated_slides()))]


# -- the cohort summary (summarise.smk) ------------------------------------------------------------
def summarised_slides():
    """The scanned slides whose results the summary reads: all but those that failed before
    (summary.tsv lists them with the stage and cause of their failure)."""
    failed = failed_before(scan_slides())
    return [sid for sid in scan_slides() if sid not in failed]


def summary_failed_args():
    """``--failed`` with the scanned slides the summary lists as failed."""
    return ["--failed", *sorted(set(scan_slides()) - set(summarised_slides()))]


def summary_truth_args(wildcards, input):
    """``--truth`` of the summary when summarise.truth names a CSV."""
    return ["--truth", input.truth] if input.truth else []


def slide_annotation(wildcards):
    """The slide's annotation file (the QC picture outlines it), or none."""
    annotation = slide_row(wildcards)["annotation"]
    return [annotation] if annotation else []


def annotation_args(wildcards, input):
    """``--annotation`` of detect when the slide has an annotation (the QC picture outlines it)."""
    return ["--annotation", input.annotation] if input.annotation else []


# -- every round evaluated (rounds.smk) ------------------------------------------------------------
def earlier_rounds():
    """The training rounds before the last whose models are evaluated too (evaluate.every_round)."""
    rounds = config["train"]["rounds"]
    if not EVAL["every_round"] or config["model"]["checkpoint"] or rounds < 2:
        return []
    return list(range(1, rounds))


def round_metrics():
    """metrics.json of every earlier round, then the last round's (results/cohort)."""
    earlier = expand(
        "results/rounds/round{round}/cohort/metrics.json", round=earlier_rounds()
    )
    return [*earlier, "results/cohort/metrics.json"]


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
