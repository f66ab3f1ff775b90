# Shared set-up: config and sample-sheet validation, wildcard constraints, input functions.
from pathlib import Path

from snakemake.logging import logger
from wsiscan.config import config_checksum, load_samples, validate_config
from wsiscan.errors import ConfigError
from wsiscan.faults import describe_failure, failed_slides, failure_record_path

SCHEMAS = Path(workflow.basedir) / "schemas"
WSISCAN_ENV = "../../envs/wsiscan.yaml"

try:
    validate_config(config, SCHEMAS)
    SAMPLES = load_samples(config["samples"], SCHEMAS)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

CONFIG_CHECKSUM = config_checksum(config)
EVAL = config["evaluate"]


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
    """Checkpoint used for inference: config model.checkpoint, else the last training round."""
    if config["model"]["checkpoint"]:
        return config["model"]["checkpoint"]
    rounds = config["train"]["rounds"]
    if rounds == 0:
        return "results/model/init.pt"
    return f"results/train/round{rounds}/model.pt"


def final_outputs():
    """Default targets: per-slide lesions of the scanned split and the cohort metrics; for a
    slide whose job failed before, also the output of the stage that failed, so that the stage
    is retried even where older files downstream of it still exist."""
    out = expand("results/{slide}/lesions.csv", slide=scan_slides())
    for sid, record in failed_before(scan_slides()).items():
        name = STAGE_OUTPUTS.get(record.get("stage"))
        if name:
            out.append(f"results/{sid}/{name}")
    if labelled_slides():
        out.append("results/cohort/metrics.json")
    return out


# `--mpp-fallback X` for the stages that open slides, when the config gives a fallback.
mpp_fallback_arg = (
    ["--mpp-fallback", config["slide"]["mpp_fallback"]]
    if config["slide"]["mpp_fallback"]
    else []
)


# -- failed slides (see wsiscan.faults) ---------------------------------------------------------
# The per-slide output each wsiscan stage writes (the stage names of the failure records).
STAGE_OUTPUTS = {
    "mask": "tissue.png",
    "grid": "rois.h5",
    "infer": "tiles.h5",
    "stitch": "probmap.h5",
    "detect": "lesions.csv",
}


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


def evaluated_slides():
    """Slides the evaluation reads: all labelled ones; with evaluate.allow_missing, without the
    slides that failed before (metrics.json lists them under "missing")."""
    slides = labelled_slides()
    if EVAL["allow_missing"]:
        failed = failed_before(slides)
        slides = [sid for sid in slides if sid not in failed]
    return slides


def report_failed_slides():
    """After a failed run: name the slides whose jobs failed and what to do about them."""
    failed = failed_before(SAMPLES.index)
    if not failed:
        return
    lines = [f"  {sid}: {describe_failure(rec)}" for sid, rec in failed.items()]
    labelled = set(failed) & set(labelled_slides())
    advice = "Fix them (logs: results/logs/<rule>/<slide>.log) and run again: every run retries them."
    if labelled and not EVAL["allow_missing"]:
        advice += (
            " The cohort evaluation needs every labelled slide; set evaluate.allow_missing: true"
            " to evaluate the others (metrics.json then lists these under 'missing')."
        )
    elif labelled:
        advice += " Until then the evaluation leaves them out (evaluate.allow_missing)."
    logger.error(
        f"wsiscan: {len(failed)} slide(s) failed (results/<slide>/FAILED.json):\n"
        + "\n".join(lines)
        + f"\n{advice}"
    )


onerror:
    report_failed_slides()
