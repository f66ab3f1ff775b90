"""One parameter path: the settings table is the only source of defaults; the schema, the
reference page, the stage records, the command line and the rules all derive from it, and
run-time settings never re-run a job."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from wsiscan import dag
from wsiscan.cli import STAGES, build_parser
from wsiscan.config import CONFIG_SCHEMA, config_checksum, config_docs, validate_config
from wsiscan.errors import ConfigError
from wsiscan.params import (
    RENAMED,
    SETTINGS,
    STAGE_PARAMS,
    WIRING,
    InferParams,
    TissueMaskParams,
    TrainRoundParams,
    config_value,
    option_name,
)

from .conftest import REPO, run_snakemake, write_tiff

RULES = REPO / "workflow" / "rules"


def demo_config() -> dict:
    return validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))


def minimal_argv(stage: str) -> list[str]:
    """``wsiscan <stage>`` with every required argument and no settings."""
    argv = [stage]
    if STAGES[stage].per_slide:
        argv += ["--slide-id", "s1"]
    for arg in STAGES[stage].args:
        if not arg.optional:
            value = "1" if arg.type is int else ("tumor" if arg.choices else "f")
            argv += [option_name(arg.name), value]
    return argv


# -- one source of defaults ------------------------------------------------------------------------
def test_schema_and_reference_page_are_generated_from_the_settings():
    assert config_docs(check=True) == [], "run `wsiscan config-docs`"


def schema_default(key: str):
    node = yaml.safe_load(CONFIG_SCHEMA.read_text())
    for part in key.split("."):
        node = node["properties"][part]
    return node.get("default")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_defaults_agree_across_schema_record_and_command_line(stage: str):
    parsed = build_parser().parse_args(minimal_argv(stage))
    record = STAGE_PARAMS[stage]()
    for name, spec in record.settings().items():
        expected = spec.default
        cli = getattr(parsed, name)
        from_schema = schema_default(spec.key)
        if isinstance(expected, tuple):
            cli, from_schema = tuple(cli), tuple(from_schema)
        assert getattr(record, name) == expected, (stage, name)
        assert cli == expected, (stage, name, cli)
        assert from_schema == expected, (stage, name, from_schema)
    # and an empty config validates to the same values
    config = validate_config({"samples": "x.tsv"})
    assert STAGE_PARAMS[stage].from_config(config) == record


def test_every_setting_is_read_by_a_stage_or_the_workflow():
    read = {s.key for cls in STAGE_PARAMS.values() for s in cls.settings().values()}
    assert set(SETTINGS) == read | set(WIRING), set(SETTINGS) ^ (read | set(WIRING))
    assert not read & set(WIRING)


@pytest.mark.parametrize("stage", sorted(STAGE_PARAMS))
def test_record_fields_are_typed_as_their_settings(stage: str):
    kinds = {int: "int", float: "float", bool: "bool", str: "str", list: "tuple", tuple: "tuple"}
    for f in STAGE_PARAMS[stage].__dataclass_fields__.values():
        spec = f.metadata["setting"]
        assert f.name == spec.name
        assert str(f.type).startswith(kinds[spec.kind]), (stage, f.name, f.type)
        assert ("None" in str(f.type)) == spec.nullable, (stage, f.name, f.type)


def test_every_key_has_a_description_and_the_reference_lists_it():
    page = (REPO / "config" / "README.md").read_text()
    for key, spec in SETTINGS.items():
        assert len(spec.help) > 10, key
        assert f"| `{spec.name}` |" in page, key


def test_config_yaml_sets_only_known_keys():
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())

    def keys(node, prefix=""):
        for k, v in node.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and path != "evaluate.exclude":
                yield from keys(v, path + ".")
            else:
                yield path

    assert set(keys(demo)) <= set(SETTINGS)


# -- validation in one place -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("infer.batch_size", 0, "must be >= 1"),
        ("infer.batch_size", 2.5, "must be an integer"),
        ("infer.batch_size", True, "must be an integer"),
        ("stitch.threshold", math.nan, "finite"),
        ("detect.nms_radius_um", math.inf, "finite"),
        ("tissue.closing_diameter_um", -1.0, ">= 0.0"),
        ("scan.n", 1_000_000, "<= 256"),
        ("tissue.artefact_hue_range", [0.7, 0.2], "ascending"),
        ("tissue.artefact_hue_range", [0.1], "2 values"),
        ("infer.device", "tpu", "does not match"),
        ("tissue.method", "otsu", "must be one of"),
    ],
)
def test_records_and_config_refuse_bad_values_naming_the_key(key, value, words):
    section, name = key.rsplit(".", 1)
    record = next(c for c in STAGE_PARAMS.values() if key in {s.key for s in c.settings().values()})
    with pytest.raises(ConfigError, match=re.escape(key)) as exc:
        record(**{name: value})
    assert words in str(exc.value)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    node = config
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[name] = value
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate_config(config)


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED.items()))
def test_renamed_keys_name_their_new_name(old, new):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    section, name = old.rsplit(".", 1)
    config[section][name] = 1.0
    with pytest.raises(ConfigError, match=re.escape(f"{old} is now {new}")):
        validate_config(config)


def test_command_line_errors_are_one_line(capsys):
    from wsiscan.cli import main

    assert main([*minimal_argv("detect"), "--threshold", "1.5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wsiscan detect: error: detect.threshold: must be <= 1.0, got 1.5"]


# -- the command line ------------------------------------------------------------------------------
def test_file_arguments_and_settings_never_share_a_name():
    for stage in STAGES.values():
        files = {a.name for a in stage.args} | {"slide_id"}
        assert not files & set(stage.params.settings()), stage.name


def test_stage_functions_take_their_files_and_their_record():
    import inspect

    for stage in STAGES.values():
        signature = inspect.signature(stage.function())
        names = set(signature.parameters)
        assert "params" in names, stage.name
        assert {a.name for a in stage.args} <= names, stage.name
        assert ("slide_id" in names) == stage.per_slide, stage.name


# -- one name per stage ----------------------------------------------------------------------------
def rule_texts() -> dict[str, str]:
    """``{rule name: its text}`` of every rule in workflow/rules/*.smk."""
    out = {}
    for smk in RULES.glob("*.smk"):
        for m in re.finditer(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", smk.read_text(), re.M | re.S):
            out[m.group(1)] = m.group(2)
    return out


def test_one_name_per_stage_through_rule_command_function_log_and_record():
    rules = rule_texts()
    assert set(STAGES) <= set(rules)
    assert set(STAGE_PARAMS) == set(STAGES)
    for name, text in rules.items():
        if name not in STAGES:
            continue
        command = re.search(r'wsiscan\(\s*"(?:--failure-record \S+ )?(\w+)', text)
        assert command and command.group(1) == name, (name, command)
        log = re.search(r'log:\n\s+"results/logs/(\w+)/', text)
        assert log and log.group(1) == name
        assert STAGES[name].function().__name__ == name
        # every rule forwards its settings through the two helpers, nothing by hand
        assert f'settings("{name}")' in text and f'runtime("{name}")' in text, name
        assert "config[" not in re.search(r"shell:(.*)", text, re.S).group(1), name


def test_failure_records_carry_the_stage_name(tmp_path, capsys):
    import json

    from wsiscan.cli import main

    record = tmp_path / "FAILED.json"
    argv = ["--failure-record", str(record), "tissue_mask", "--slide-id", "s1", "--slide"]
    argv += [str(tmp_path / "missing.tif"), "--out-mask", str(tmp_path / "m.png")]
    argv += ["--out-qc", str(tmp_path / "q.png")]
    assert main(argv) == 1
    assert json.loads(record.read_text())["stage"] == "tissue_mask"


# -- the workflow's side: options, the round plan --------------------------------------------------
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_workflow_options_build_the_record_of_the_config(stage: str):
    """A stage run by hand with the options the rule passes gets the record of the config."""
    config = demo_config()
    context = {"round": 2} if stage == "train_round" else {}
    argv = minimal_argv(stage)
    argv += dag.stage_options(config, stage, **context)
    argv += dag.runtime_options(config, stage, threads=3)
    parsed = build_parser().parse_args(argv)
    record = STAGE_PARAMS[stage](**{n: getattr(parsed, n) for n in STAGE_PARAMS[stage].settings()})
    expected = STAGE_PARAMS[stage].from_config(config)
    if stage == "train_round":
        plan = dag.round_plan(config, 2)
        expected = expected.replace(epochs=plan.epochs, lr=plan.lr)
    if "threads" in expected.settings():
        expected = expected.replace(threads=3)
    assert record == expected


def test_runtime_settings_are_kept_apart_from_the_rerun_trigger():
    config = demo_config()
    for stage, record in STAGE_PARAMS.items():
        result = dag.stage_values(config, stage, runtime=False, round=1)
        runtime = dag.stage_values(config, stage, runtime=True)
        assert set(result) | set(runtime) == set(record.settings())
        assert all(not record.settings()[n].runtime for n in result)
        assert all(record.settings()[n].runtime for n in runtime)
    assert {"workers", "batch_size", "device", "dense_mode"} <= set(
        dag.stage_values(config, "infer", runtime=True)
    )


def test_config_checksum_ignores_runtime_settings():
    config = demo_config()
    before = config_checksum(config)
    edited = copy.deepcopy(config)
    edited["infer"]["workers"] = 7
    edited["train"]["device"] = "cpu"
    assert config_checksum(edited) == before
    edited["detect"]["threshold"] = 0.3
    assert config_checksum(edited) != before


def test_round_plan():
    config = demo_config()
    config["train"].update(epochs=5, finetune_epochs=2, lr=0.01, finetune_lr_scale=0.1)
    first, second = dag.round_plan(config, 1), dag.round_plan(config, 2)
    assert (first.init, first.epochs, first.lr) == ("random", 5, 0.01)
    assert (second.init, second.epochs) == ("previous", 2)
    assert second.lr == pytest.approx(0.001)
    # the input names are the rule's and the command line's
    assert second.inputs() == {
        "hard_negatives": ["results/train/round1/hard_negatives.h5"],
        "init_model": "results/train/round1/model.pt",
    }
    assert {a.name for a in STAGES["train_round"].args} >= set(second.inputs())
    config["train"]["round_init"] = "scratch"
    config["model"]["imagenet_weights"] = "vgg16_bn.pth"
    third = dag.round_plan(config, 3)
    assert (third.init, third.epochs, third.lr) == ("imagenet", 5, 0.01)
    assert "init_model" not in third.inputs()
    with pytest.raises(ConfigError, match="numbered from 1"):
        dag.round_plan(config, 0)


def test_model_file():
    config = demo_config()
    assert dag.model_file(config) == "results/train/round2/model.pt"
    config["train"]["rounds"] = 0
    assert dag.model_file(config) == "results/model/init.pt"
    config["model"]["checkpoint"] = "trained.pt"
    assert dag.model_file(config) == "trained.pt"


def test_mpp_fallback_goes_only_to_slides_without_a_resolution(tmp_path: Path):
    config = demo_config()
    with_mpp, without = write_tiff(tmp_path / "a.tif", 0.5), write_tiff(tmp_path / "b.tif", None)
    implausible = write_tiff(tmp_path / "c.tif", 352.8)  # a 72 dpi TIFF

    def fallback(path) -> float | None:
        values = dag.stage_values(config, "tissue_mask", runtime=False, slide_path=path)
        return values["mpp_fallback"]

    assert fallback(with_mpp) is None and fallback(without) is None  # no fallback configured
    config["slide"]["mpp_fallback"] = 0.25
    assert fallback(with_mpp) is None
    assert fallback(without) == 0.25 and fallback(implausible) == 0.25
    assert fallback(tmp_path / "data" / "demo" / "x.tif") is None  # a demo slide, not written yet
    assert TissueMaskParams.from_config(config).mpp_fallback == 0.25


def test_infer_record_refuses_unknown_fields():
    with pytest.raises(TypeError):
        InferParams(num_workers=2)  # the old name at the boundary is gone


def test_train_round_record_has_the_model_and_augment_keys():
    settings = TrainRoundParams.settings()
    assert settings["width"].key == "model.width"
    assert settings["hue"].key == "train.augment.hue"
    assert config_value({}, "model.width") == 1.0


# -- the DAG: run-time settings never re-run a job -------------------------------------------------
#: Every run-time key.
RUNTIME_KEYS = [key for key, spec in SETTINGS.items() if spec.runtime]


def _runtime_value(key: str, current):
    spec = SETTINGS[key]
    if spec.choices:
        return next(c for c in spec.choices if c != current)
    if spec.pattern:
        return "cpu" if current != "cpu" else "auto"
    return current + 1


def _edit(root: Path, key: str, value) -> None:
    path = root / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    node = cfg
    *sections, name = key.split(".")
    for part in sections:
        node = node.setdefault(part, {})
    node[name] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.mark.slow
def test_runtime_settings_never_rerun_a_job(trained_cohort: Path):
    root = trained_cohort
    original = (root / "config" / "config.yaml").read_text()
    config = validate_config(yaml.safe_load(original))
    try:
        for key in RUNTIME_KEYS:
            _edit(root, key, _runtime_value(key, config_value(config, key)))
        proc = run_snakemake(root, "--cores", "2", "--dry-run")
        out = proc.stdout + proc.stderr
        assert "Nothing to be done" in out, f"run-time edits re-ran jobs:\n{out[-3000:]}"
        # (one dry run covers each key alone too: an edit that re-ran a job alone would show as a
        # changed param, code or input in the run with every edit)
        # a result setting does re-run its stage (the trigger still works)
        (root / "config" / "config.yaml").write_text(original)
        _edit(root, "train.mine.threshold", 0.6)
        out = run_snakemake(root, "--cores", "2", "--dry-run")
        assert "mine_negatives" in out.stdout and "Params have changed" in out.stdout + out.stderr
    finally:
        (root / "config" / "config.yaml").write_text(original)


@pytest.mark.slow
def test_mpp_fallback_reruns_only_the_slides_without_a_resolution(trained_cohort: Path):
    root = trained_cohort
    original = (root / "config" / "config.yaml").read_text()
    try:
        _edit(root, "slide.mpp_fallback", 0.25)
        out = run_snakemake(root, "--cores", "2", "--dry-run").stdout
        jobs = set()
        for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
            rule = re.match(r"(?:local)?rule (\w+):", block)
            slide = re.search(r"wildcards: slide=(\S+)", block)
            if rule and rule.group(1) != "all":
                jobs.add((rule.group(1), slide.group(1) if slide else None))
        assert jobs == {
            (stage, "nompp") for stage in ("tissue_mask", "roi_grid", "infer", "stitch", "detect")
        } | {("summarise", None)}, out[-3000:]  # the summary lists every scanned slide
    finally:
        (root / "config" / "config.yaml").write_text(original)


@pytest.mark.slow
def test_every_training_round_is_evaluated(trained_cohort: Path):
    """evaluate.every_round: round 1's model scans the test split too, and rounds.tsv sets the
    figures that keep moving (false positives per normal slide, low-FP sensitivities) per round."""
    import pandas as pd

    root = trained_cohort
    table = pd.read_csv(root / "results" / "cohort" / "rounds.tsv", sep="\t")
    assert table["round"].tolist() == [1, 2]
    assert table["model"].tolist() == [f"results/train/round{k}/model.pt" for k in (1, 2)]
    for column in ("fp_per_normal_slide", "sensitivity_at_0.25_fp", "sensitivity_at_0.5_fp"):
        assert table[column].notna().all(), column
    for k in (1, 2):
        base = root / "results" / ("rounds/round1" if k == 1 else "")
        metrics = json.loads((base / "cohort" / "metrics.json").read_text())
        assert metrics["model"]["round"] == k
        assert metrics["fp_per_normal_slide"] == table["fp_per_normal_slide"][k - 1]
    assert (root / "results" / "rounds" / "round1" / "sn" / "lesions.csv").is_file()
