"""What the workflow's rules ask of the package: settings as command options, the round plan, the
retry targets and the report of failed slides.

Rules only wire files; the decisions they need live here, where tests reach them:

* :func:`stage_options` -- a stage's result settings from the config, as ``wsiscan <stage>``
  options (the rule passes them as ``params``, so Snakemake re-runs the job when one changes);
* :func:`runtime_options` -- its run-time settings (workers, threads, device, ...), which the rule
  passes through a ``params`` function of ``threads``: Snakemake counts such a parameter as
  derived from the job's resources and never as a rerun trigger;
* :func:`round_plan` -- which model a training round starts from, its epochs and learning rate;
* :func:`retry_targets` and :func:`failure_report` -- what the default target adds for slides
  whose job failed before, and what the end of a failed run says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .faults import describe_failure
from .params import (
    STAGE_PARAMS,
    TissueMaskParams,
    TrainRoundParams,
    config_value,
    to_argv,
)


# -- settings as options ---------------------------------------------------------------------------
def _record(stage: str):
    try:
        return STAGE_PARAMS[stage]
    except KeyError:
        raise ConfigError(f"unknown stage {stage!r}; stages: {sorted(STAGE_PARAMS)}") from None


def stage_values(
    config: Mapping[str, Any], stage: str, *, runtime: bool, **context: Any
) -> dict[str, Any]:
    """``{field: value}`` of ``stage``'s result settings (``runtime=False``) or run-time settings
    from a validated config. ``context``: ``slide_path`` (tissue_mask: the fallback resolution
    goes only to a slide without its own), ``round`` (train_round: the round plan's epochs and
    learning rate), ``threads`` (the job's threads, for a ``threads`` field)."""
    record = _record(stage)
    values = {
        name: config_value(config, spec.key)
        for name, spec in record.settings().items()
        if spec.runtime == runtime
    }
    if record is TissueMaskParams and not runtime:
        values["mpp_fallback"] = mpp_fallback_for(config, context.get("slide_path"))
    if record is TrainRoundParams and not runtime:
        plan = round_plan(config, int(context["round"]))
        values.update(epochs=plan.epochs, lr=plan.lr)
    if runtime and "threads" in values and context.get("threads") is not None:
        values["threads"] = int(context["threads"])
    return values


def stage_options(config: Mapping[str, Any], stage: str, **context: Any) -> list[str]:
    """The result settings of ``stage`` as ``wsiscan <stage>`` options (see :func:`stage_values`)."""
    return to_argv(_record(stage), stage_values(config, stage, runtime=False, **context))


def runtime_options(config: Mapping[str, Any], stage: str, **context: Any) -> list[str]:
    """The run-time settings of ``stage`` as ``wsiscan <stage>`` options."""
    return to_argv(_record(stage), stage_values(config, stage, runtime=True, **context))


def mpp_fallback_for(config: Mapping[str, Any], slide_path: str | Path | None) -> float | None:
    """``slide.mpp_fallback`` for a slide whose file carries no plausible resolution, else None.

    Demo slides (not written yet at planning time) carry theirs. A file that cannot be opened
    gets the fallback: its job fails on opening it anyway.
    """
    fallback = config_value(config, "slide.mpp_fallback")
    if fallback is None or slide_path is None:
        return None
    path = Path(slide_path)
    if not path.exists():
        return None  # a demo slide, written with its resolution by synth_slide
    from .slide import file_mpp

    return None if file_mpp(path) is not None else float(fallback)


# -- training rounds -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundPlan:
    """Training round ``k``: where its model starts, its epochs and peak learning rate."""

    round: int
    init: Literal["previous", "imagenet", "random"]
    epochs: int
    lr: float

    def inputs(self) -> dict[str, Any]:
        """The round's extra input files: hard negatives of rounds < k, the starting model."""
        k = self.round
        inputs: dict[str, Any] = {
            "hard_negatives": [f"results/train/round{j}/hard_negatives.h5" for j in range(1, k)]
        }
        if self.init == "previous":
            inputs["init_model"] = f"results/train/round{k - 1}/model.pt"
        return inputs


def round_plan(config: Mapping[str, Any], k: int) -> RoundPlan:
    """The plan of round ``k >= 1``: with ``train.round_init: finetune`` rounds ``k >= 2`` start
    from round ``k-1``'s model and train ``finetune_epochs`` at ``lr * finetune_lr_scale``;
    otherwise a round starts from the ImageNet trunk (``model.imagenet_weights``) or a seeded
    random init and trains ``epochs`` at ``lr``."""
    if k < 1:
        raise ConfigError(f"training rounds are numbered from 1, got round {k}")
    lr = float(config_value(config, "train.lr"))
    if k >= 2 and config_value(config, "train.round_init") == "finetune":
        scale = float(config_value(config, "train.finetune_lr_scale"))
        return RoundPlan(
            k, "previous", int(config_value(config, "train.finetune_epochs")), lr * scale
        )
    init = "imagenet" if config_value(config, "model.imagenet_weights") else "random"
    return RoundPlan(k, init, int(config_value(config, "train.epochs")), lr)


def model_file(config: Mapping[str, Any]) -> str:
    """The checkpoint inference uses: ``model.checkpoint``, else the last round's, else (no
    rounds) the untrained model."""
    checkpoint = config_value(config, "model.checkpoint")
    if checkpoint:
        return str(checkpoint)
    rounds = int(config_value(config, "train.rounds"))
    return f"results/train/round{rounds}/model.pt" if rounds else "results/model/init.pt"


# -- failed slides ---------------------------------------------------------------------------------
def retry_targets(
    failed: Mapping[str, Mapping[str, Any]], stage_outputs: Mapping[str, str]
) -> list[str]:
    """For every slide whose job failed before, the output of the stage that failed (the rule's
    first output with ``{slide}`` filled in), so that the stage is retried even where older files
    downstream of it still exist. ``stage_outputs``: ``{stage: output pattern}``."""
    out = []
    for sid, record in failed.items():
        pattern = stage_outputs.get(str(record.get("stage")))
        if pattern:
            out.append(pattern.replace("{slide}", sid))
    return out


def failure_report(
    failed: Mapping[str, Mapping[str, Any]], labelled: Iterable[str], allow_missing: bool
) -> str | None:
    """The end-of-run message naming every failed slide, its stage and cause, and what to do."""
    if not failed:
        return None
    lines = [f"  {sid}: {describe_failure(rec)}" for sid, rec in failed.items()]
    advice = (
        "Fix them (logs: results/logs/<stage>/<slide>.log) and run again: every run retries them."
    )
    if set(failed) & set(labelled):
        if allow_missing:
            advice += " Until then the evaluation leaves them out (evaluate.allow_missing)."
        else:
            advice += (
                " The cohort evaluation needs every labelled slide; set evaluate.allow_missing:"
                " true to evaluate the others (metrics.json then lists these under 'missing')."
            )
    return (
        f"wsiscan: {len(failed)} slide(s) failed (results/<slide>/FAILED.json):\n"
        + "\n".join(lines)
        + f"\n{advice}"
    )
