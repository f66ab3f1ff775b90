"""The memory allocator of the torch stages, chosen once when ``wsiscan <stage>`` starts.

A torch stage allocates the same large activations batch after batch. glibc's defaults hand
every buffer above 32 MiB back to the kernel when it is freed, and it page-faults in again at
the next batch (system time 7 s -> 102 s on one slide), so the command restarts itself once with
settings in its environment (:func:`restart_environment`):

* always, glibc's :data:`MALLOC_TUNING`: no mmap for large buffers, no trimming of the heap.
  Fast, but large and small allocations share one heap: where the few small ones made during a
  batch land among its freed activations decides how much the heap grows at the next batch, by
  up to one activation, differently from run to run (benchmarks/README.md, ``infer_rss``);
* for block inference (:data:`JEMALLOC_STAGES`), jemalloc when it is installed
  (:func:`find_jemalloc`), preloaded with page decay off (:data:`JEMALLOC_CONF`): it keeps large
  allocations in extents of their own, apart from small ones, so each batch reuses the previous
  batch's freed extents whole, and freed pages stay mapped as in glibc's never-trimmed heap. The
  peak is that of one batch, the same for every slide size and every run.

Neither can change a result: the arithmetic is the same, only where buffers lie differs.
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError

#: Stages that run torch on the CPU as well as on a GPU.
TORCH_STAGES = frozenset({"infer", "train_round", "mine_negatives"})
#: Stages that run the FCN over a slide's blocks: jemalloc's measured gain (flat peak RSS).
JEMALLOC_STAGES = frozenset({"infer", "mine_negatives"})

#: glibc malloc settings for the torch stages: freed activation buffers stay in the heap instead
#: of going back to the kernel and page-faulting in again at the next batch. The mmap threshold
#: (16 GiB) lies above the largest activation (conv1 of a 2884 px block at full width: 2.1 GB per
#: block), and the heap is not trimmed (32 GiB), so a process keeps its peak until it exits.
#: Measured: CPU inference of the demo model 1.8x, a training step 1.7x and the full-width FCN on a
#: 2868 px ROI 1.5x faster (benchmarks/README.md, ``malloc`` and ``fcn_vs_patch``). glibc reads
#: them at process start only (``mallopt`` caps the mmap threshold at 32 MiB).
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**35)}
NO_MALLOC_TUNING_ENV = "WSISCAN_MALLOC_TUNING"  # "0": keep the allocator's defaults

#: ``WSISCAN_JEMALLOC``: a path to libjemalloc.so.2, or "0" for glibc's malloc; unset: search
JEMALLOC_ENV = "WSISCAN_JEMALLOC"
JEMALLOC_SONAME = "libjemalloc.so.2"
#: jemalloc options: freed pages are never purged (dirty) nor advised away (muzzy), so no batch
#: page-faults in what the previous one freed (with the default 10 s decay: system time 14 s ->
#: 205 s on a 69-block slide)
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


#: every variable :func:`restart_environment` may set
RESTART_VARIABLES = frozenset({*MALLOC_TUNING, "LD_PRELOAD", "MALLOC_CONF"})


def malloc_tuning_applies(stage: str, environ: Mapping[str, str]) -> bool:
    """Whether ``wsiscan <stage>`` should restart itself with :func:`restart_environment`: a
    torch stage, glibc, not switched off, and neither :data:`MALLOC_TUNING` variable set already
    (by the user, whose settings win, or by a first start)."""
    return (
        stage in TORCH_STAGES
        and sys.platform.startswith("linux")
        and platform.libc_ver()[0] == "glibc"
        and environ.get(NO_MALLOC_TUNING_ENV, "1") != "0"
        and not any(key in environ for key in MALLOC_TUNING)
    )


def _library_dirs(environ: Mapping[str, str]) -> list[Path]:
    """Where :func:`find_jemalloc` looks, in order: this Python's environment, the active conda
    environment, then the system's library folders (multiarch first, as the linker does)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    prefixes = [sys.prefix, environ.get("CONDA_PREFIX")]
    dirs = [Path(p) / "lib" for p in prefixes if p]
    for root in ("/usr/lib", "/lib"):
        dirs.append(Path(root) / multiarch)
    return dirs + [Path(d) for d in ("/usr/lib64", "/lib64", "/usr/local/lib", "/usr/lib")]


def find_jemalloc(environ: Mapping[str, str]) -> str | None:
    """The path of jemalloc for ``LD_PRELOAD``: ``$WSISCAN_JEMALLOC`` if set (``"0"``: none),
    else the first ``libjemalloc.so.2`` of this Python's environment, of ``$CONDA_PREFIX`` (the
    conda environment of ``--sdm conda`` has it) or of the system's library folders (the
    ``libjemalloc2`` package of Debian and Ubuntu, ``jemalloc`` of EPEL). ``None`` if there is
    none.

    Raises
    ------
    ConfigError
        ``$WSISCAN_JEMALLOC`` names a file that does not exist.
    """
    choice = environ.get(JEMALLOC_ENV, "")
    if choice == "0":
        return None
    if choice:
        if not Path(choice).is_file():
            raise ConfigError(
                f"{JEMALLOC_ENV}={choice!r}: no such file (a path to {JEMALLOC_SONAME}, "
                "or 0 for glibc's malloc)"
            )
        return choice
    for folder in _library_dirs(environ):
        if (folder / JEMALLOC_SONAME).is_file():
            return str(folder / JEMALLOC_SONAME)
    return None


def restart_environment(stage: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables ``wsiscan <stage>`` adds to its environment when it restarts itself:
    :data:`MALLOC_TUNING`, and for :data:`JEMALLOC_STAGES`, when :func:`find_jemalloc` finds
    jemalloc, ``LD_PRELOAD`` (in front of the user's) and ``MALLOC_CONF`` (unless the user set
    it)."""
    extra = dict(MALLOC_TUNING)
    library = find_jemalloc(environ) if stage in JEMALLOC_STAGES else None
    if library:
        preload = environ.get("LD_PRELOAD", "")
        extra["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
        if "MALLOC_CONF" not in environ:
            extra["MALLOC_CONF"] = JEMALLOC_CONF
    return extra


def active_allocator(environ: Mapping[str, str] = os.environ) -> str:
    """What allocates this process's memory, for its log: the jemalloc file mapped into it
    (read from ``/proc/self/maps``) with its options, else glibc's malloc with its settings."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode[, path]
        if len(fields) == 6 and Path(fields[5]).name.startswith("libjemalloc"):
            return f"jemalloc {fields[5]}, MALLOC_CONF={environ.get('MALLOC_CONF', 'defaults')}"
    tuned = {k: environ[k] for k in MALLOC_TUNING if k in environ}
    return f"glibc malloc, settings {tuned or 'defaults'}"
