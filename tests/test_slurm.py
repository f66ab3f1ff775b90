"""The SLURM profile: its options, `wsiscan install-profile`, the 1000-slide DAG, and the demo
workflow through a real single-node SLURM (munge + slurmctld + slurmd started by the fixture).

The SLURM tests need root and either SLURM or apt-get (tests/slurm/slurm-up.sh installs the Debian
packages and starts the daemons without systemd); elsewhere they are skipped with that reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from wsiscan.cli import main as wsiscan_main
from wsiscan.errors import ConfigError
from wsiscan.profiles import install_profile, user_profile_root

from .conftest import BIN, REPO, run_snakemake, snakemake_env
from .test_rerun import write_small_demo

PROFILE = REPO / "profiles" / "slurm"
SLURM_SCRIPTS = REPO / "tests" / "slurm"
SNAKEFILE = REPO / "workflow" / "Snakefile"
PIDFILES = {
    "munged": Path("/run/munge/munged.pid"),
    "slurmctld": Path("/run/slurm/slurmctld.pid"),
    "slurmd": Path("/run/slurm/slurmd.pid"),
}
JOBCOMP = Path("/var/log/slurm/jobcomp.txt")
SLURM_LOGS = Path("/var/log/slurm")
FAKE_GPUS = 2


def profile_config() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


# -- the profile ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def snakemake_help() -> str:
    return subprocess.run(
        [str(BIN / "snakemake"), "--help"], capture_output=True, text=True, check=True
    ).stdout


def test_profile_options_are_snakemake_options(snakemake_help: str):
    cfg = profile_config()
    assert cfg["executor"] == "slurm"
    for key in cfg:
        assert re.search(rf"^\s+--{re.escape(key)}\b", snakemake_help, re.M), key
    # the settings the issue asks for
    assert cfg["keep-going"] is True and cfg["rerun-incomplete"] is True
    assert cfg["retries"] >= 1
    assert cfg["slurm-status-command"] in ("squeue", "sacct")
    # cpus_per_task as a default would override every rule's threads
    assert not any(r.startswith("cpus_per_task") for r in cfg["default-resources"])
    assert any(r.startswith("slurm_partition=") for r in cfg["default-resources"])


def test_profile_names_only_rules_of_the_workflow(workdir: Path):
    proc = run_snakemake(workdir, "--list-rules")
    rules = set(proc.stdout.split())
    cfg = profile_config()
    named = set(cfg["set-resources"])
    named |= {g.split("=", 1)[0] for g in cfg["groups"]}
    assert named <= rules, named - rules
    groups = {g.split("=", 1)[1] for g in cfg["groups"]}
    assert groups == {c.split("=", 1)[0] for c in cfg["group-components"]}
    for rule in ("infer", "train_round", "mine_negatives"):  # the GPU rules
        assert cfg["set-resources"][rule]["slurm_partition"]


def resources_by_rule(output: str) -> dict[str, str]:
    """``{rule: its 'resources:' line}`` of a dry run (the last job printed per rule)."""
    out: dict[str, str] = {}
    rule = None
    for line in output.splitlines():
        if m := re.match(r"\s*(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif (m := re.match(r"\s*resources: (.*)$", line)) and rule:
            out[rule] = m.group(1)
    return out


def test_profile_resources_partitions_gpus_and_attempts(workdir: Path):
    """Dry run of the default demo (training included) through the profile: partitions, GPU
    requests, and memory/runtime scaled by the attempt (Snakemake's --attempt sets the first)."""
    first = resources_by_rule(run_snakemake(workdir, "--profile", str(PROFILE), "--dry-run").stdout)
    third = resources_by_rule(
        run_snakemake(workdir, "--profile", str(PROFILE), "--dry-run", "--attempt", "3").stdout
    )
    for rule in ("infer", "train_round", "mine_negatives"):
        assert "slurm_partition=gpu" in first[rule] and "gpu=1" in first[rule], first[rule]
    for rule in ("tissue_mask", "roi_grid", "stitch", "detect", "evaluate", "train_patches"):
        assert "slurm_partition=cpu" in first[rule] and "gpu=1" not in first[rule], first[rule]
    for rule in ("tissue_mask", "roi_grid", "detect", "evaluate", "infer", "stitch", "train_round"):
        mem1 = int(re.search(r"\bmem_mb=(\d+)", first[rule]).group(1))
        mem3 = int(re.search(r"\bmem_mb=(\d+)", third[rule]).group(1))
        run1 = int(re.search(r"\bruntime=(\d+)", first[rule]).group(1))
        run3 = int(re.search(r"\bruntime=(\d+)", third[rule]).group(1))
        assert (mem3, run3) == (3 * mem1, 3 * run1), rule


# -- install-profile -----------------------------------------------------------------------------
def test_install_profile_links_and_is_idempotent(tmp_path: Path):
    target = install_profile("slurm", dest_root=tmp_path)
    assert target == tmp_path / "slurm" and target.is_symlink()
    assert target.resolve() == PROFILE.resolve()
    assert install_profile("slurm", dest_root=tmp_path) == target  # again: nothing to do
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slurm"]


def test_install_profile_refuses_a_different_profile_unless_forced(tmp_path: Path):
    other = tmp_path / "slurm"
    other.mkdir()
    (other / "config.yaml").write_text("executor: slurm\njobs: 5\n")
    with pytest.raises(ConfigError, match="already exists.*--force"):
        install_profile("slurm", dest_root=tmp_path)
    assert (other / "config.yaml").read_text() == "executor: slurm\njobs: 5\n"
    target = install_profile("slurm", dest_root=tmp_path, force=True)
    assert target.is_symlink() and target.resolve() == PROFILE.resolve()
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("slurm.bak-")]
    assert len(backups) == 1 and (backups[0] / "config.yaml").read_text().endswith("jobs: 5\n")


def test_install_profile_copy_mode(tmp_path: Path):
    target = install_profile("slurm", dest_root=tmp_path, copy=True)
    assert target.is_dir() and not target.is_symlink()
    assert (target / "config.yaml").read_bytes() == (PROFILE / "config.yaml").read_bytes()
    assert install_profile("slurm", dest_root=tmp_path, copy=True) == target  # identical copy
    with pytest.raises(ConfigError, match="a folder with the same files"):
        install_profile("slurm", dest_root=tmp_path)  # a link asked for, a copy is there
    (target / "config.yaml").write_text("executor: slurm\n")  # edited by the user
    with pytest.raises(ConfigError, match="a folder with different files"):
        install_profile("slurm", dest_root=tmp_path, copy=True)
    assert (target / "config.yaml").read_text() == "executor: slurm\n"


def test_install_profile_rejects_bad_sources(tmp_path: Path):
    with pytest.raises(ConfigError, match="not a Snakemake profile"):
        install_profile("slurm", source=tmp_path / "nothing", dest_root=tmp_path / "root")
    with pytest.raises(ConfigError, match="invalid profile name"):
        install_profile("../x", dest_root=tmp_path)


def test_install_profile_cli_errors_are_one_line(tmp_path: Path, capsys):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "config.yaml").write_text("jobs: 1\n")
    assert wsiscan_main(["install-profile", "--dest", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("wsiscan install-profile: error:") and "--force" in err[-1]


def test_bare_profile_name_works_from_the_repository_root(workdir: Path, tmp_path: Path):
    """`snakemake --profile slurm` from the repository root: not found before `wsiscan
    install-profile`, found after it (Snakemake looks in $XDG_CONFIG_HOME/snakemake)."""
    env = snakemake_env()
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    cmd = [str(BIN / "snakemake"), "--profile", "slurm", "--dry-run", "--directory", str(workdir)]
    before = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert before.returncode != 0 and "slurm" in before.stderr
    install = subprocess.run(
        [str(BIN / "wsiscan"), "install-profile"], env=env, capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr
    link = tmp_path / "xdg" / "snakemake" / "slurm"
    assert link.is_symlink() and link.resolve() == PROFILE.resolve()
    after = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert after.returncode == 0, after.stderr
    assert "slurm_partition=gpu" in after.stdout  # the profile's per-rule resources are in force


def test_user_profile_root_follows_xdg(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    if sys.platform.startswith("linux"):
        assert user_profile_root() == tmp_path / "snakemake"


# -- DAG scale -----------------------------------------------------------------------------------
N_DAG_SLIDES = 1000


def dag_job_counts(output: str) -> dict[str, int]:
    """``{rule: count}`` of the "Job stats" table of a dry run, with ``total``."""
    match = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?\ntotal\s+\d+)", output, re.S)
    assert match, output
    return {r: int(n) for r, n in re.findall(r"^(\S+)\s+(\d+)\s*$", match.group(1), re.M)}


@pytest.mark.slow
def test_dry_run_dag_of_1000_slides(tmp_path: Path):
    """The DAG of a 1000-slide cohort builds through the SLURM profile (groups, resources), with
    every slide's five jobs. How fast it builds, also without the profile, is a benchmark
    (benchmarks/bench_dag.py), not a test."""
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_dag import make_cohort

    workdir = make_cohort(tmp_path, N_DAG_SLIDES)  # half tumour; train.rounds 0
    per_slide = ("tissue_mask", "roi_grid", "infer", "stitch", "detect")
    expected = {rule: N_DAG_SLIDES for rule in per_slide}
    expected.update(init_model=1, check_model=1, evaluate=1, summarise=1, all=1)
    expected["total"] = 5 * N_DAG_SLIDES + 5
    proc = run_snakemake(
        workdir, "--dry-run", "--cores", "1", "--quiet", "rules", "--profile", str(PROFILE)
    )
    assert dag_job_counts(proc.stdout + proc.stderr) == expected


# -- a real SLURM --------------------------------------------------------------------------------
def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def slurm_cluster():
    """A single-node SLURM on this machine with fake GPUs; stops the daemons it started."""
    if os.geteuid() != 0:
        pytest.skip("real-SLURM test needs root (to install and start munge, slurmctld, slurmd)")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("real-SLURM test needs SLURM installed or apt-get to install it")
    running_before = {d for d, f in PIDFILES.items() if _alive(f)}
    env = dict(os.environ, SLURM_FAKE_GPUS=str(FAKE_GPUS), SLURM_MINJOBAGE="900")
    up = subprocess.run(
        [str(SLURM_SCRIPTS / "slurm-up.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    started = [d for d, f in PIDFILES.items() if _alive(f) and d not in running_before]
    try:
        assert up.returncode == 0, f"slurm-up.sh failed:\n{up.stdout}\n{up.stderr}"
        node = subprocess.run(
            ["sinfo", "-h", "-o", "%N %P"], capture_output=True, text=True, check=True
        ).stdout
        yield node
    finally:
        if started:
            subprocess.run(
                [str(SLURM_SCRIPTS / "slurm-down.sh"), *started],
                capture_output=True,
                text=True,
                timeout=120,
            )


def run_cluster_snakemake(workdir: Path, env: dict, *args: str, timeout: float = 900):
    """Snakemake in ``workdir``; on a timeout it is stopped with SIGTERM so that it cancels its
    SLURM jobs."""
    cmd = [str(BIN / "snakemake"), "--snakefile", str(SNAKEFILE), *args]
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"snakemake timed out after {timeout} s:\n{out}\n{err}") from None
    return proc.returncode, out + err


def scontrol_job(jobid: str) -> str:
    return subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True).stdout


@pytest.mark.slow
@pytest.mark.slurm
def test_demo_workflow_through_sbatch(slurm_cluster: str, workdir: Path, tmp_path: Path):
    """The demo workflow via `snakemake --profile slurm` (installed by `wsiscan install-profile`):
    every job goes through sbatch, GPU rules with their GPU request, light rules in groups; then
    several slides in one infer job, one of them failing."""
    assert "gpu" in slurm_cluster
    slides = [("t1", "tumor"), ("n1", "normal")]
    write_small_demo(workdir, slides)
    env = snakemake_env()
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    assert (
        subprocess.run([str(BIN / "wsiscan"), "install-profile"], env=env, check=True).returncode
        == 0
    )
    rc, log = run_cluster_snakemake(
        workdir,
        env,
        "--profile",
        "slurm",
        # the test cluster's only override: the first status poll 2 s after submission
        "--slurm-init-seconds-before-status-checks",
        "2",
    )
    assert rc == 0, log
    for sid, _ in slides:
        assert (workdir / "results" / sid / "lesions.csv").is_file()
    assert (workdir / "results" / "cohort" / "metrics.json").is_file()

    # every job was submitted with sbatch and has its SLURM log under .snakemake/slurm_logs
    submitted = dict(re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.", log))
    assert submitted, log
    slurm_logs = workdir / ".snakemake" / "slurm_logs"
    for jobid, path in submitted.items():
        assert Path(path).is_file() and Path(path).name == f"{jobid}.log"
        assert Path(path).is_relative_to(slurm_logs)
    by_kind: dict[str, list[str]] = {}
    for jobid, path in submitted.items():
        by_kind.setdefault(Path(path).relative_to(slurm_logs).parts[0], []).append(jobid)
    assert len(by_kind["rule_infer"]) == len(slides)
    assert len(by_kind["rule_synth_slide"]) == len(slides)
    assert len(by_kind["rule_evaluate"]) == 1 and len(by_kind["rule_init_model"]) == 1
    prep = [k for k in by_kind if k.startswith("group_prep")]
    post = [k for k in by_kind if k.startswith("group_post")]
    assert prep and post, by_kind
    # two slides, up to eight per group: one or two jobs per group (Snakemake regroups the
    # pending slides as jobs finish)
    assert 1 <= len(by_kind[prep[0]]) <= 2 and 1 <= len(by_kind[post[0]]) <= 2
    for sid, _ in slides:
        assert list((slurm_logs / "rule_infer" / sid).glob("*.log"))

    # the controller allocated and completed exactly these jobs, run in this working directory
    ctld = (SLURM_LOGS / "slurmctld.log").read_text()
    slurmd = (SLURM_LOGS / "slurmd.log").read_text()
    completed = {}
    for line in JOBCOMP.read_text().splitlines():
        if f"WorkDir={workdir} " in line:
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            completed[fields["JobId"]] = fields
    assert set(completed) == set(submitted)
    for jobid in submitted:
        assert completed[jobid]["JobState"] == "COMPLETED", (jobid, submitted[jobid])
        assert f"_slurm_rpc_submit_batch_job: JobId={jobid} " in ctld
        # started by the main scheduler or by the backfill scheduler
        assert re.search(rf"(sched: Allocate|_start_job: Started) JobId={jobid} ", ctld)
        assert f"Launching batch job {jobid} " in slurmd
    for jobid in by_kind["rule_infer"]:
        assert completed[jobid]["Partition"] == "gpu"
        assert "gres:gpu:1" in scontrol_job(jobid)  # the real GPU request (TresPerJob)
    for kind in ("rule_evaluate", prep[0], post[0]):
        assert all(completed[j]["Partition"] == "cpu" for j in by_kind[kind])
    # group jobs run their slides one after another: one CPU, the memory of the largest job, the
    # runtime of all (prep: tissue_mask 10 + roi_grid 10 min, post: stitch 20 + detect 10 min)
    for kind, mem, minutes in ((prep[0], "2000M", 20), (post[0], "3000M", 30)):
        jobs = [completed[j] for j in by_kind[kind]]
        assert all(j["ProcCnt"] == "1" and f"mem={mem}" in j["Tres"] for j in jobs), jobs
        assert sum(int(j["TimeLimit"]) for j in jobs) == minutes * len(slides), jobs

    # no job of this run is left in the queue
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    queued = subprocess.run(
        ["squeue", "-h", "-n", run_id, "-t", "PENDING,RUNNING"], capture_output=True, text=True
    )
    assert queued.stdout.strip() == ""

    # a second run finds nothing to do
    rc, log2 = run_cluster_snakemake(workdir, env, "--profile", "slurm", "--dry-run")
    assert rc == 0 and "Nothing to be done" in log2, log2

    # several slides per GPU job (the profile's commented-out `infer` group): t1 fails (its level
    # 0 cannot be decoded) and leaves its failure record and no tiles; the group's other slide
    # keeps its tiles, equal to those of one slide per job (keep-incomplete; without it Snakemake
    # deletes every output of the failed group job)
    reference = _tiles(workdir, "n1")
    _damage_level0(workdir / "data" / "demo" / "t1.tif")
    groups = ["tissue_mask=prep", "roi_grid=prep", "stitch=post", "detect=post", "infer=infer"]
    rc, log3 = run_cluster_snakemake(
        workdir,
        env,
        *("--profile", "slurm", "--slurm-init-seconds-before-status-checks", "2"),
        *("--groups", *groups, "--group-components", "prep=8", "post=8", "infer=2"),
        *("--retries", "0", "--forcerun", "infer", "--"),
        *(f"results/{sid}/tiles.h5" for sid, _ in slides),
    )
    assert rc != 0, log3
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.", log3)
    assert len(submitted) == 1 and "/group_infer" in submitted[0][1], submitted  # one GPU job
    record = json.loads((workdir / "results" / "t1" / "FAILED.json").read_text())
    assert record["stage"] == "infer" and record["slide_id"] == "t1", record
    assert "level 0" in record["cause"]
    assert not (workdir / "results" / "t1" / "tiles.h5").exists()
    # n1: computed again in the group job before t1, or not reached: kept either way
    assert np.array_equal(_tiles(workdir, "n1"), reference)


def _damage_level0(slide: Path) -> None:
    """Zero the JPEG header of every level-0 tile of ``slide`` (the reduced levels stay fine, so
    the mask and the grid do not change), keeping its modification time."""
    import tifffile

    stat = slide.stat()
    with tifffile.TiffFile(slide) as tf:
        offsets = list(tf.pages[0].dataoffsets)
    with open(slide, "r+b") as fh:
        for offset in offsets:
            fh.seek(offset)
            fh.write(bytes(32))
    os.utime(slide, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _tiles(workdir: Path, sid: str):
    import h5py

    with h5py.File(workdir / "results" / sid / "tiles.h5") as f:
        return f["tiles"][()]
