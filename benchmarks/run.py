"""Run every benchmark, write ``benchmarks/results/<date>-<host>.json`` and refresh the table in
``benchmarks/README.md``.

Each benchmark is a function ``bench(smoke: bool) -> dict`` registered in a module's ``BENCHMARKS``
mapping; it returns ``{"figures": [{"name", "value", "unit", "goal"?, "met"?}, ...], ...details}``.
Every benchmark runs in its own subprocess so that peak-memory figures (``ru_maxrss``) belong to it
alone. Comparisons (A vs B) run both sides inside the same benchmark, so ratios hold on a noisy machine.

    python -m benchmarks.run              # full run (tens of minutes on 2 cores)
    python -m benchmarks.run --smoke      # seconds: every harness on tiny inputs (part of the tests)
    python -m benchmarks.run --gpu        # the GPU benchmark (needs CUDA)
    python -m benchmarks.run --only fcn_vs_patch,dag
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = ["bench_model", "bench_pipeline", "bench_train", "bench_dag", "bench_gpu"]
TABLE_BEGIN = "<!-- results-table:begin -->"
TABLE_END = "<!-- results-table:end -->"


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


def render_table(report: dict) -> str:
    """Markdown table of every figure of a report."""
    lines = [
        f"Machine: `{report['machine']['platform']}`, {report['machine']['cpus']} CPUs"
        + (f", {report['machine']['gpu']}" if "gpu" in report["machine"] else "")
        + f"; date {report['date']}; command `{report['command']}`.",
        "",
        "| benchmark | figure | value | unit | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in report["benchmarks"].items():
        if "error" in result:
            lines.append(f"| {name} | error | {result['error']} | | | no |")
            continue
        for fig in result.get("figures", []):
            met = fig.get("met")
            lines.append(
                f"| {name} | {fig['name']} | {fig['value']} | {fig.get('unit', '')} | "
                f"{fig.get('goal', '')} | {'' if met is None else ('yes' if met else 'no')} |"
            )
    return "\n".join(lines)


def update_readme(table: str, readme: Path = HERE / "README.md") -> None:
    """Replace the table between the markers in benchmarks/README.md (append markers if absent)."""
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    block = f"{TABLE_BEGIN}\n{table}\n{TABLE_END}"
    if TABLE_BEGIN in text and TABLE_END in text:
        head, rest = text.split(TABLE_BEGIN, 1)
        text = head + block + rest.split(TABLE_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Latest results\n\n" + block + "\n"
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny inputs, seconds (used by the tests)")
    p.add_argument("--gpu", action="store_true", help="run only the GPU benchmark")
    p.add_argument("--only", default="", help="comma-separated benchmark names")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON")
    p.add_argument("--no-readme", action="store_true", help="do not touch benchmarks/README.md")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one benchmark, print JSON
    args = p.parse_args(argv)

    if args.one:
        print(json.dumps(run_one(args.one, args.smoke)))
        return 0

    names = list(registry())
    if args.only:
        names = [n for n in args.only.split(",") if n]
    elif args.gpu:
        names = [n for n in names if n.startswith("gpu")]
    else:
        names = [n for n in names if not n.startswith("gpu")]
    report = {
        "date": dt.date.today().isoformat(),
        "command": "python -m benchmarks.run "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "smoke": args.smoke,
        "machine": machine(),
        "benchmarks": {},
    }
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "benchmarks.run", "--one", name]
        cmd += ["--smoke"] if args.smoke else []
        proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode != 0:
            report["benchmarks"][name] = {"error": f"exit {proc.returncode}"}
            continue
        report["benchmarks"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{report['date']}-{report['machine']['host']}" + ("-smoke" if args.smoke else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = render_table(report)
    print(table)
    if not args.no_readme and not args.smoke:
        update_readme(table)
    failed = [n for n, r in report["benchmarks"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
