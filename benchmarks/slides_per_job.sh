#!/usr/bin/env bash
# slides_per_job.sh WORKDIR K [JOBS]: the infer jobs of every slide of WORKDIR's sheet through the
# SLURM profile with K slides per GPU job (the profile's `infer` group), then the figures: wall
# time of the run, and per SLURM job its elapsed time (from slurmctld's jobcomp file).
#
# WORKDIR holds a config/ (e.g. tests/test_rerun.py's write_small_demo) whose rois.h5 files and
# model check exist already (run the workflow locally up to them first). Needs a SLURM cluster
# (tests/slurm/slurm-up.sh brings up a single-node one with SLURM_FAKE_GPUS=2). JOBS (default 8)
# caps the jobs at once: 1 runs one job after another. Used for benchmarks/README.md,
# "slides_per_job".
set -euo pipefail
WORKDIR=$1
K=$2
JOBS=${3:-8}
REPO=$(cd "$(dirname "$0")/.." && pwd)
JOBCOMP=${JOBCOMP:-/var/log/slurm/jobcomp.txt}
cd "$WORKDIR"
mapfile -t SLIDES < <(tail -n +2 config/slides.tsv | cut -f1)
TARGETS=()
for sid in "${SLIDES[@]}"; do TARGETS+=("results/$sid/tiles.h5"); done
before=$(wc -l < "$JOBCOMP" || echo 0)
t0=$(date +%s.%N)
snakemake --snakefile "$REPO/workflow/Snakefile" --profile "$REPO/profiles/slurm" \
  --slurm-init-seconds-before-status-checks 2 \
  --groups tissue_mask=prep roi_grid=prep stitch=post detect=post infer=infer \
  --group-components prep=8 post=8 "infer=$K" --jobs "$JOBS" --forcerun infer \
  -- "${TARGETS[@]}" > "slides_per_job_K$K.log" 2>&1
t1=$(date +%s.%N)
echo "slides=${#SLIDES[@]} K=$K jobs_at_once=$JOBS wall_s=$(echo "$t1 - $t0" | bc)"
tail -n +"$((before + 1))" "$JOBCOMP" | grep "WorkDir=$PWD " | python3 -c '
import re, sys
from datetime import datetime
t = lambda s: datetime.fromisoformat(s)
for line in sys.stdin:
    f = dict(re.findall(r"(\w+)=(\S*)", line))
    print(f["JobId"], f["JobState"], "elapsed_s", (t(f["EndTime"]) - t(f["StartTime"])).seconds)
'
for sid in "${SLIDES[@]}"; do
  printf '%s infer_s %s\n' "$sid" "$(tail -1 "results/benchmarks/infer/$sid.tsv" | cut -f1)"
done
