# Shared set-up: config and sample-sheet validation, wildcard constraints, input functions.
from pathlib import Path

from wsiscan.config import config_checksum, load_samples, validate_config
from wsiscan.errors import ConfigError

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
    """Default targets: per-slide lesions of the scanned split and the cohort metrics."""
    out = expand("results/{slide}/lesions.csv", slide=scan_slides())
    if labelled_slides():
        out.append("results/cohort/metrics.json")
    return out


# `--mpp-fallback X` for the stages that open slides, when the config gives a fallback.
mpp_fallback_arg = (
    ["--mpp-fallback", config["slide"]["mpp_fallback"]]
    if config["slide"]["mpp_fallback"]
    else []
)
