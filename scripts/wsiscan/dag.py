"""What the workflow's rules ask of the package: settings as command options, the round plan, the
retry targets and the report of failed slides.

Rules only wire files; the decisions they need live here, where tests reach them:

* :func:`stage_options` -- a stage's result settings from the config, as ``wsiscan <stage>``
  options (the rule passes them as ``params``, so Snakemake re-runs the job when one changes);
* :func:`runtime_options` -- its run-time settings (workers, threads, device, ...), which the rule
  passes through a ``params`` function of ``threads``: Snakemake counts such a parameter as
  derived from the job's resources and never as a rerun trigger;
* :func:`memory_request_mb` -- the first attempt's ``mem_mb`` of the torch stages, derived from
  the geometry, width, batch, workers and device (:mod:`wsiscan.memory`); a resource, which
  Snakemake never counts as a rerun trigger;
* :func:`round_plan` -- which model a training round starts from, its epochs and learning rate;
* :func:`model_check_record` -- the record of rule ``check_model``, which every ``infer`` job
  waits for (a bad checkpoint fails that one job, before any slide's tiles are removed);
* :func:`nothing_to_scan` -- why a sheet and config give the default target nothing to do;
* :func:`retry_targets`, :func:`failed_jobs` and :func:`failure_report` -- what the default
  target adds for slides whose job failed before, which jobs of a run failed (killed ones
  included), and what the end of a failed run says.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .faults import describe_failure
from .fileio import sha256_json
from .params import (
    STAGE_PARAMS,
    TissueMaskParams,
    TrainRoundParams,
    config_value,
    to_argv,
)


def memory_request_mb(config: Mapping[str, Any], stage: str) -> int:
    """Memory (MB) the first attempt of ``stage`` (``infer``, ``mine_negatives``,
    ``train_round``) asks for; the rules multiply it by the attempt
    (:func:`wsiscan.memory.stage_memory_mb`)."""
    from .memory import stage_memory_mb

    return stage_memory_mb(config, stage)


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


def model_check_record(config: Mapping[str, Any]) -> str:
    """``results/model/checks/<model file stem>.<hash of its path>.json``: the record that rule
    ``check_model`` writes for the model of :func:`model_file`. One record per model path, so
    that a config set back to an earlier model finds that model's record (and re-runs nothing).
    """
    model = model_file(config)
    return f"results/model/checks/{Path(model).stem}.{sha256_json(model, 10)}.json"


def nothing_to_scan(config: Mapping[str, Any], splits: Iterable[str]) -> str | None:
    """Why the default target would be empty, or None: no slide of the sheet is in
    ``evaluate.split`` (``splits``: the split of every row) while ``model.checkpoint`` is set,
    so no training runs either."""
    split = config_value(config, "evaluate.split")
    splits = list(splits)
    if split in splits or not config_value(config, "model.checkpoint"):
        return None
    found = ", ".join(sorted(set(splits))) or "none"
    return (
        f"nothing to do: evaluate.split is {split!r} but no slide of the sample sheet "
        f"{config_value(config, 'samples')} is in that split (splits there: {found}), and "
        "model.checkpoint is set, so no training runs either. Set evaluate.split to the split "
        "you want to scan, or add slides of that split to the sheet"
    )


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


#: A job log the rules write: ``results/logs/<rule>/<slide, round or name>.log``.
_JOB_LOG = re.compile(r"(?:^|/)results/logs/(?P<rule>\w+)/(?P<name>[^/\s]+)\.log$")
#: How Snakemake names the logs of a failed job (single and group jobs alike).
_FAILED_LOG = re.compile(
    r"^\s*log: (?P<logs>.+?) \(check log file\(s\) for error details\)\s*$", re.M
)
#: The last line a stage writes: ``wsiscan <stage>: error: ...`` or ``wsiscan <stage>: done``.
_ERROR_LINE = re.compile(r"wsiscan (?P<stage>\w+): error: (?P<cause>.*)$", re.M)
DONE_LINE = "wsiscan {stage}: done"
KILLED = (
    "stopped without a message: killed by the system? (out of memory, scancel, a time limit, a "
    "node failure; on SLURM `sacct -j <jobid>` says which)"
)


@dataclass(frozen=True)
class FailedJob:
    """A job that failed in this run: its rule, the name in its log path (the slide, the round),
    its log file and what it says: ``cause`` is its error line, else :data:`KILLED`."""

    rule: str
    name: str
    log: str
    cause: str


def failed_jobs(snakemake_log: str, *, since: float | None = None) -> list[FailedJob]:
    """The jobs that failed in a Snakemake run, from the text of its log (``Error in rule``
    blocks, group jobs included), with what each job's own log says.

    A job whose log ends without ``wsiscan <stage>: error:`` and without the ``done`` line of a
    finished stage (or that has no log written since ``since``, the run's start in seconds since
    the epoch) was stopped from outside: killed for memory, cancelled, out of time. Jobs that
    finished inside a failed group job are left out.
    """
    out: dict[str, FailedJob] = {}
    for m in _FAILED_LOG.finditer(snakemake_log):
        for log in (p.strip() for p in m.group("logs").split(",")):
            found = _JOB_LOG.search(log)
            if not found or log in out:
                continue
            rule, name = found.group("rule"), found.group("name")
            path = Path(log)
            try:
                fresh = since is None or path.stat().st_mtime >= since
                text = path.read_text(errors="replace") if fresh else ""
            except OSError:
                text = ""
            errors = list(_ERROR_LINE.finditer(text))
            if errors:
                cause = errors[-1].group("cause").strip()
            elif DONE_LINE.format(stage=rule) in text:
                continue  # it finished; its group job failed for another member
            else:
                cause = KILLED
            out[log] = FailedJob(rule, name, log, cause)
    return list(out.values())


def failure_report(
    failed: Mapping[str, Mapping[str, Any]],
    labelled: Iterable[str],
    allow_missing: bool,
    jobs: Iterable[FailedJob] = (),
) -> str | None:
    """The end-of-run message naming every failed slide, its stage and cause, every other job
    of this run that failed (``jobs``: cohort and training jobs, and jobs killed from outside,
    which leave no failure record), and what to do."""
    recorded = {(str(rec.get("stage")), sid) for sid, rec in failed.items()}
    others = [j for j in jobs if (j.rule, j.name) not in recorded]
    if not failed and not others:
        return None
    parts = []
    if failed:
        lines = [f"  {sid}: {describe_failure(rec)}" for sid, rec in failed.items()]
        advice = "Fix them (logs: results/logs/<stage>/<slide>.log) and run again: every run retries them."
        if set(failed) & set(labelled):
            if allow_missing:
                advice += " Until then the evaluation leaves them out (evaluate.allow_missing)."
            else:
                advice += (
                    " The cohort evaluation needs every labelled slide; set evaluate.allow_missing:"
                    " true to evaluate the others (metrics.json then lists these under 'missing')."
                )
        parts.append(
            f"wsiscan: {len(failed)} slide(s) failed (results/<slide>/FAILED.json):\n"
            + "\n".join(lines)
            + f"\n{advice}"
        )
    if others:
        lines = [f"  {j.rule} {j.name}: {j.cause} (log: {j.log})" for j in others]
        parts.append(f"wsiscan: {len(others)} more job(s) failed in this run:\n" + "\n".join(lines))
    return "\n".join(parts)
