"""The torch stages' choice of allocator (wsiscan.allocator): what the restart adds to the
environment, and where jemalloc is looked for. The real restarts, on glibc's malloc and on the
real jemalloc, are tested in test_infer_stitch.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wsiscan.allocator import (
    JEMALLOC_CONF,
    JEMALLOC_ENV,
    JEMALLOC_SONAME,
    MALLOC_TUNING,
    find_jemalloc,
    restart_environment,
)
from wsiscan.errors import ConfigError


@pytest.fixture
def library(tmp_path: Path) -> str:
    path = tmp_path / "lib" / JEMALLOC_SONAME
    path.parent.mkdir()
    path.write_bytes(b"")
    return str(path)


def test_block_inference_preloads_jemalloc_before_the_users_libraries(library):
    env = restart_environment("infer", {JEMALLOC_ENV: library, "LD_PRELOAD": "/opt/mine.so"})
    assert env == {
        **MALLOC_TUNING,
        "LD_PRELOAD": f"{library}:/opt/mine.so",
        "MALLOC_CONF": JEMALLOC_CONF,
    }
    assert restart_environment("mine_negatives", {JEMALLOC_ENV: library})["LD_PRELOAD"] == library


def test_users_jemalloc_options_win(library):
    env = restart_environment("infer", {JEMALLOC_ENV: library, "MALLOC_CONF": "narenas:2"})
    assert env["LD_PRELOAD"] == library and "MALLOC_CONF" not in env


def test_training_and_switched_off_keep_glibc(library):
    assert restart_environment("train_round", {JEMALLOC_ENV: library}) == MALLOC_TUNING
    assert restart_environment("infer", {JEMALLOC_ENV: "0"}) == MALLOC_TUNING
    assert find_jemalloc({JEMALLOC_ENV: "0", "CONDA_PREFIX": str(Path(library).parents[1])}) is None


def test_environments_are_searched_before_the_system(library, monkeypatch):
    prefix = str(Path(library).parents[1])
    monkeypatch.setattr(sys, "prefix", "/nonexistent-prefix")
    assert find_jemalloc({"CONDA_PREFIX": prefix}) == library
    monkeypatch.setattr(sys, "prefix", prefix)  # a venv or conda env that holds jemalloc
    assert find_jemalloc({}) == library
    found = find_jemalloc({JEMALLOC_ENV: library})
    assert found == library and Path(found).is_absolute()


def test_a_missing_library_is_a_config_error(tmp_path):
    missing = tmp_path / JEMALLOC_SONAME
    with pytest.raises(ConfigError, match=f"{JEMALLOC_ENV}=.*no such file"):
        restart_environment("infer", {JEMALLOC_ENV: str(missing)})
    assert restart_environment("train_round", {JEMALLOC_ENV: str(missing)}) == MALLOC_TUNING
