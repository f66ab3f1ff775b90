"""Snakemake ecosystem conventions: the workflow catalog's file, the licence, the conda
environment against pyproject.toml, the READMEs against the files, and which profile
``wsiscan install-profile`` links. (The module test, which runs Snakemake, is test_module.py.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from wsiscan.cli import main as wsiscan_main
from wsiscan.profiles import REPO_PROFILES, install_profile

from .conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONDA_ENV = REPO / "workflow" / "envs" / "wsiscan.yaml"


# -- the Snakemake workflow catalog ----------------------------------------------------------------
#: What the catalog reads (snakemake-workflow-catalog's generate-catalog.py and its usage page).
CATALOG_DEPLOYMENTS = {"conda", "singularity", "singularity+conda", "apptainer", "apptainer+conda"}


def test_catalog_file_has_the_keys_the_catalog_reads():
    settings = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert set(settings) == {"usage"}
    usage = settings["usage"]
    assert set(usage) <= {"mandatory-flags", "software-stack-deployment", "report"}
    deployment = usage["software-stack-deployment"]
    assert set(deployment) <= CATALOG_DEPLOYMENTS and all(
        isinstance(v, bool) for v in deployment.values()
    )
    assert deployment["conda"] is True  # the rules declare workflow/envs/wsiscan.yaml
    assert usage["report"] is True  # every report() output has a caption in workflow/report/
    flags = usage["mandatory-flags"]
    assert set(flags) == {"desc", "flags"} and isinstance(flags["flags"], str)
    assert len(flags["desc"]) > 50
    # the "standardized usage" listing also needs these
    assert (REPO / "workflow" / "Snakefile").is_file() and (REPO / "config" / "README.md").is_file()
    assert list((REPO / "workflow" / "rules").glob("*.smk"))
    readme = (REPO / "README.md").read_text().lower()
    assert "snakemake" in readme and "workflow" in readme


def test_report_captions_exist():
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for caption in re.findall(r'caption="([^"]+)"', smk.read_text()):
            assert (smk.parent / caption).is_file(), (smk.name, caption)


def test_license_is_the_one_pyproject_names():
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Permission is hereby granted" in text


# -- the conda environment -------------------------------------------------------------------------
def conda_pip_requirements() -> list[str]:
    env = yaml.safe_load(CONDA_ENV.read_text())
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip) == 1
    return pip[0]


def test_conda_environment_lists_pyprojects_dependencies():
    """The rules' environment holds pyproject.toml's dependencies, the same specifiers (so that
    its content, and Snakemake's hash of it, changes when they do), torch pinned to the
    Makefile's build; no local path (it is built in .snakemake/conda/, wherever the clone is)."""
    declared = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    listed = {Requirement(r).name: Requirement(r) for r in conda_pip_requirements()}
    assert set(listed) == set(declared), "edit workflow/envs/wsiscan.yaml with pyproject.toml"
    for name, req in listed.items():
        if name == "torch":
            continue
        assert str(req) == str(declared[name]), (name, str(req), str(declared[name]))
    makefile_torch = re.search(r"^TORCH \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert str(listed["torch"].specifier) == f"=={makefile_torch.group(1)}"
    assert declared["torch"].specifier.contains(makefile_torch.group(1))
    env = yaml.safe_load(CONDA_ENV.read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    required = PYPROJECT["project"]["requires-python"]
    assert python == "python=3.11" and required == ">=3.11"
    for line in conda_pip_requirements():
        assert not line.startswith("-") and ".." not in line and "file:" not in line, line
    # the rules point at it, relative to their own folder
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    rel = re.search(r'^WSISCAN_ENV = "([^"]+)"', common, re.M).group(1)
    assert (REPO / "workflow" / "rules" / rel).resolve() == CONDA_ENV.resolve()


# -- the READMEs against the files -----------------------------------------------------------------
#: Paths the READMEs name that the user or the workflow writes (no repository file).
WRITTEN_LATER = {
    "config/my.yaml", "config/camelyon16_slides.tsv", "config/new_cohort.tsv", "config/new_cohort.yaml"
}  # fmt: skip
GENERATED_PREFIXES = ("results/", "data/", ".snakemake/", "benchmarks/results/")


#: Top-level folders: a word of a command that starts with one of them names a repository path.
TOP_LEVEL = ("config/", "workflow/", "profiles/", "scripts/", "tests/", "benchmarks/", "envs/")


def named_paths(text: str) -> set[str]:
    """Repository paths a Markdown page names: inline code and link targets with a ``/``, words of
    commands (inline or in code blocks) that start with a top-level folder, and the first column
    of the README's layout block."""
    layout = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S)
    if layout:  # its first column names paths; the rest describes them
        first = {line.split()[0] for line in layout.group(1).splitlines() if line.strip()}
        text = text.replace(layout.group(1), "")
    candidates = set(re.findall(r"`([^`\n]+)`", text)) | (first if layout else set())
    candidates |= set(re.findall(r"\]\(([^)\s]+)\)", text))
    code = re.findall(r"`([^`\n]+)`", text) + re.findall(r"```\w*\n(.*?)```", text, re.S)
    candidates |= {
        word.strip("\"'(),;")
        for block in code
        for word in block.split()
        if word.strip("\"'(),;").startswith(TOP_LEVEL)
    }
    out = set()
    for token in candidates:
        token = token.split("#")[0]
        path_like = re.fullmatch(r"[A-Za-z0-9_.][\w.*/-]*", token) and "/" in token
        if not path_like and token not in ("LICENSE", ".snakemake-workflow-catalog.yml"):
            continue
        if token.startswith(GENERATED_PREFIXES) or token in WRITTEN_LATER or "://" in token:
            continue
        out.add(token)
    return out


@pytest.mark.parametrize("page", ["README.md", "config/README.md"])
def test_every_path_the_readme_names_exists(page: str):
    paths = named_paths((REPO / page).read_text())
    assert {"profiles/slurm/config.yaml", "workflow/envs/wsiscan.yaml"} & paths, "no paths found?"
    missing = sorted(p for p in paths if not list(REPO.glob(p.rstrip("/"))))
    assert not missing, f"{page} names paths that do not exist: {missing}"


def headings(page: Path) -> set[str]:
    return {m.strip() for m in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}


def test_every_readme_section_the_files_point_to_exists():
    """``README, "<section>"`` in the repository's files (comments too) names a real heading."""
    readmes = {
        "README": headings(REPO / "README.md"),
        "config/README.md": headings(REPO / "config" / "README.md"),
        "benchmarks/README.md": headings(REPO / "benchmarks" / "README.md"),
    }
    files = [REPO / "README.md", REPO / "config" / "README.md", REPO / "Makefile"]
    files += list((REPO / "workflow").rglob("*.yaml")) + list((REPO / "workflow").rglob("*.smk"))
    files += list((REPO / "profiles").rglob("*.yaml")) + list((REPO / "config").glob("*.yaml"))
    files.append(REPO / ".snakemake-workflow-catalog.yml")
    found = 0
    for path in files:
        text = re.sub(r"\n\s*#\s*", " ", path.read_text())  # comments wrapped over lines
        for where, title in re.findall(
            r"\b((?:config/|benchmarks/)?README(?:\.md)?)`?,? \"([^\"]+)\"", text
        ):
            key = "README" if where in ("README", "README.md") else where
            assert title in readmes[key], f"{path.name}: {where}, {title!r} is no heading there"
            found += 1
    assert found >= 4


# -- install-profile -------------------------------------------------------------------------------
def test_install_profile_links_the_current_folders_profile(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    (project / "profiles" / "slurm").mkdir(parents=True)
    (project / "profiles" / "slurm" / "config.yaml").write_text("executor: slurm\n")
    monkeypatch.chdir(project)
    assert wsiscan_main(["install-profile", "--dest", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "slurm").resolve() == (project / "profiles" / "slurm").resolve()
    out = capsys.readouterr().out
    assert str(project / "profiles" / "slurm") in out and "of the current folder" in out

    # a folder without a profile: the clone the package comes from, and the message says so
    monkeypatch.chdir(tmp_path)
    assert wsiscan_main(["install-profile", "--dest", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "slurm").resolve() == (REPO_PROFILES / "slurm").resolve()
    assert "of the clone wsiscan is installed from" in capsys.readouterr().out
    # the function itself follows the same rule
    monkeypatch.chdir(project)
    target = install_profile("slurm", dest_root=tmp_path / "c")
    assert target.resolve() == (project / "profiles" / "slurm").resolve()
