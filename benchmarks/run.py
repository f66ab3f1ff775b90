"""Run every benchmark, write ``benchmarks/results/<date>T<time>-<host>.json`` and refresh the
tables in ``benchmarks/README.md``.

Each benchmark is a function ``bench(smoke: bool) -> dict`` registered in a module's ``BENCHMARKS``
mapping; it returns ``{"figures": [{"name", "value", "unit", "goal"?, "met"?}, ...], ...details}``.
Every benchmark runs in its own subprocess so that peak-memory figures (``ru_maxrss``) belong to it
alone. Comparisons (A vs B) run both sides inside the same benchmark, so ratios hold on a noisy machine.

    python -m benchmarks.run              # full run (tens of minutes on 2 cores)
    python -m benchmarks.run --smoke      # seconds: every harness on tiny inputs (part of the tests;
                                          # not stain_centres: --smoke --only stain_centres)
    python -m benchmarks.run --gpu        # the GPU benchmark (needs CUDA)
    python -m benchmarks.run --only fcn_vs_patch,dag
    python -m benchmarks.run --readme-from benchmarks/results/<date>T<time>-<host>.json
                                          # put a report made elsewhere (the GPU run) in the README

Every full run merges its results into ``benchmarks/results/latest.json`` (the latest result of
each benchmark, with its run) and redraws the two tables of benchmarks/README.md from it: CPU
benchmarks between the ``results-table`` markers, GPU ones (names starting with ``gpu``) between
the ``results-table-gpu`` markers. So ``--only`` runs and a report made on the GPU machine update
their rows and leave the others.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = [
    "bench_model",
    "bench_pipeline",
    "bench_io",
    "bench_scale",
    "bench_train",
    "bench_dag",
    "bench_stain",
    "bench_gpu",
]
TABLE_BEGIN = "<!-- results-table:begin -->"
TABLE_END = "<!-- results-table:end -->"
GPU_TABLE_BEGIN = "<!-- results-table-gpu:begin -->"
GPU_TABLE_END = "<!-- results-table-gpu:end -->"
#: Benchmarks whose smoke run takes minutes (several trainings, each scanning its test slides):
#: left out of ``--smoke`` runs of every benchmark (the test suite's); ``--smoke --only NAME``
#: still runs one.
HEAVY_SMOKE = frozenset({"stain_centres"})
#: Benchmarks of stages that run with glibc's default allocator settings (not torch stages).
DEFAULT_MALLOC = frozenset({"mask_grid", "stitch_rss", "dag"})
#: The latest result of every benchmark, whichever run it came from (the README tables' source).
LATEST = HERE / "results" / "latest.json"


def registry() -> dict[str, tuple[str, str]]:
    """``{benchmark name: (module, function name)}`` over the benchmark modules present."""
    out: dict[str, tuple[str, str]] = {}
    for mod in MODULES:
        try:
            module = importlib.import_module(f"benchmarks.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmarks.{mod}":
                raise
            continue
        for name, func in getattr(module, "BENCHMARKS", {}).items():
            out[name] = (mod, func.__name__)
    return out


def run_one(name: str, smoke: bool) -> dict:
    """Run benchmark ``name`` in this process and return its result with timing and peak RSS."""
    import resource

    mod, func = registry()[name]
    module = importlib.import_module(f"benchmarks.{mod}")
    if smoke:  # a harness check, not a measurement: one torch thread stays fast on a busy machine
        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:
            pass
    t0 = time.perf_counter()
    result = getattr(module, func)(smoke=smoke)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def machine() -> dict:
    """The machine the figures come from."""
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def table_rows(report: dict, run: str | None = None) -> list[str]:
    """Markdown table rows of every figure of a report (a last column ``run`` when given)."""
    end = f" {run} |" if run is not None else ""
    rows = []
    for name, result in report["benchmarks"].items():
        if "error" in result:
            rows.append(f"| {name} | error | {result['error']} | | | no |{end}")
            continue
        for fig in result.get("figures", []):
            met = fig.get("met")
            rows.append(
                f"| {name} | {fig['name']} | {fig['value']} | {fig.get('unit', '')} | "
                f"{fig.get('goal', '')} | {'' if met is None else ('yes' if met else 'no')} |{end}"
            )
    return rows


def render_table(report: dict) -> str:
    """Markdown table of every figure of a report, under a line naming machine, date, command."""
    lines = [
        f"Machine: {_machine_text(report['machine'])}; date {report['date']}; "
        f"command `{report['command']}`.",
        "",
        "| benchmark | figure | value | unit | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + table_rows(report))


def update_readme(table: str, readme: Path = HERE / "README.md", gpu: bool = False) -> None:
    """Replace the table between the markers in benchmarks/README.md (append markers if absent).

    ``gpu`` selects the GPU table's markers instead of the CPU table's.
    """
    begin, end = (GPU_TABLE_BEGIN, GPU_TABLE_END) if gpu else (TABLE_BEGIN, TABLE_END)
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        title = "Latest GPU results" if gpu else "Latest results"
        text = text.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
    readme.write_text(text)


def merge_latest(report: dict, path: Path = LATEST) -> dict:
    """Record every benchmark of ``report`` as that benchmark's latest result (with the run's
    date, machine and command) in ``path``, keeping the other benchmarks' entries; return all."""
    latest = json.loads(path.read_text()) if path.exists() else {"benchmarks": {}}
    for name, result in report["benchmarks"].items():
        latest["benchmarks"][name] = {
            "date": report["date"],
            "machine": report["machine"],
            "command": report["command"],
            "load_average_start": report.get("load_average_start"),
            "result": result,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_report(latest, path)
    return latest


def _machine_text(machine: dict) -> str:
    text = f"`{machine.get('platform', '?')}`, {machine.get('cpus', '?')} CPUs"
    return text + (f", {machine['gpu']}" if "gpu" in machine else "")


def render_latest(latest: dict, gpu: bool) -> str:
    """Markdown table of the latest result of every CPU (or GPU) benchmark, with the run each
    comes from (R1, R2, ... listed below the table)."""
    entries = {n: e for n, e in latest["benchmarks"].items() if n.startswith("gpu") == gpu}
    if not entries:
        return "No run recorded yet."
    runs: dict[tuple[str, str, str, str], str] = {}
    lines = [
        "| benchmark | figure | value | unit | goal | met | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in entries.items():
        load = entry.get("load_average_start")
        load_text = f", load average {load[0]:g} at the start" if load else ""
        key = (entry["date"], _machine_text(entry["machine"]), load_text, entry["command"])
        run = runs.setdefault(key, f"R{len(runs) + 1}")
        lines += table_rows({"benchmarks": {name: entry["result"]}}, run)
    lines.append("")
    for (date, machine, load_text, command), run in runs.items():
        lines.append(f"{run}: {date}, {machine}{load_text}; `{command}`.  ")
    return "\n".join(lines).rstrip()


def refresh_readme(report: dict, readme: Path = HERE / "README.md", latest: Path = LATEST) -> None:
    """Merge ``report`` into the latest results and redraw both README tables from them."""
    merged = merge_latest(report, latest)
    update_readme(render_latest(merged, gpu=False), readme)
    update_readme(render_latest(merged, gpu=True), readme, gpu=True)


def run_child(name: str, smoke: bool, timeout_s: float | None = None) -> dict:
    """Run benchmark ``name`` in a fresh process (its own session); return its result or
    ``{"error": ...}``. The child's stderr streams through; on timeout its whole process group
    (DataLoader workers included) is killed. The child gets the glibc allocator settings of the
    torch stages (unless ``WSISCAN_MALLOC_TUNING=0`` or the benchmark is in
    :data:`DEFAULT_MALLOC`)."""
    from wsiscan.allocator import MALLOC_TUNING, malloc_tuning_applies

    cmd = [sys.executable, "-m", "benchmarks.run", "--one", name] + (["--smoke"] if smoke else [])
    # the allocator settings the torch stages give themselves (wsiscan.allocator), so that stages run
    # in-process are measured as the `wsiscan` command runs them (`malloc` compares both); the
    # benchmarks of the other stages run with glibc's defaults, as those stages do
    env = dict(os.environ)
    if name not in DEFAULT_MALLOC and malloc_tuning_applies("infer", env):
        env.update(MALLOC_TUNING)
    proc = subprocess.Popen(
        cmd,
        cwd=HERE.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=50)
    stdout: list[str] = []

    def pump_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
        sys.stderr.flush()

    def pump_stdout() -> None:
        assert proc.stdout is not None
        stdout.append(proc.stdout.read())

    readers = [threading.Thread(target=f, daemon=True) for f in (pump_stderr, pump_stdout)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"error": f"timed out after {timeout_s:g} s"}
    finally:
        for reader in readers:
            reader.join(timeout=10)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in "".join(tail).replace("\r", "\n").splitlines() if ln.strip()]
        cause = lines[-1][:300].replace("|", "/") if lines else ""
        return {"error": f"exit {proc.returncode}: {cause}".rstrip(": ")}
    lines = "".join(stdout).strip().splitlines()
    if not lines:
        return {"error": "the benchmark printed no result"}
    return json.loads(lines[-1])


def _plain(value: object) -> object:
    """JSON fallback for numpy scalars and arrays and paths in benchmark results."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_report(report: dict, path: Path) -> None:
    """Write the JSON report atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny inputs, seconds (used by the tests)")
    p.add_argument("--gpu", action="store_true", help="run only the GPU benchmark")
    p.add_argument("--only", default="", help="comma-separated benchmark names")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the JSON (default benchmarks/results; smoke runs: benchmarks/results/tmp)",
    )
    p.add_argument("--no-readme", action="store_true", help="do not touch benchmarks/README.md")
    p.add_argument(
        "--readme-from",
        type=Path,
        help="only put the table of this JSON report (e.g. one from the GPU machine) in the README",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds allowed per benchmark (default: no limit)",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one benchmark, print JSON
    args = p.parse_args(argv)
    if args.out is None:  # smoke reports are throw-away: keep them out of the committed folder
        args.out = HERE / "results" / "tmp" if args.smoke else HERE / "results"

    if args.one:
        print(json.dumps(run_one(args.one, args.smoke), default=_plain))
        return 0
    if args.readme_from:
        report = json.loads(args.readme_from.read_text())
        print(render_table(report))
        refresh_readme(report)
        return 0

    names = list(registry())
    if args.only:
        names = [n for n in args.only.split(",") if n]
    elif args.gpu:
        names = [n for n in names if n.startswith("gpu")]
    else:
        names = [n for n in names if not n.startswith("gpu")]
        names = [n for n in names if not (args.smoke and n in HEAVY_SMOKE)]
    started = dt.datetime.now()
    report = {
        "date": started.date().isoformat(),
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]
        ),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "smoke": args.smoke,
        "machine": machine(),
        "benchmarks": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{started:%Y-%m-%dT%H%M%S}-{report['machine']['host']}" + ("-smoke" * args.smoke)
    out_json = args.out / f"{stem}.json"
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        report["benchmarks"][name] = run_child(name, args.smoke, args.timeout)
        write_report(report, out_json)  # after each benchmark: a killed run keeps what it had
    write_report(report, out_json)
    table = render_table(report)
    print(table)
    if not args.no_readme and not args.smoke:
        refresh_readme(report)
    failed = [n for n, r in report["benchmarks"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
