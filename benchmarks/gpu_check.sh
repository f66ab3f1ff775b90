#!/usr/bin/env bash
# One-shot GPU check for wsiscan, for a bare GPU machine without network (run from anywhere):
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine; results go to $OUT
#   WSISCAN_GPU_BENCH_SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#                                                    # dry run on a CPU machine, seconds
#
# 1. installs the carried wheels (.whl/*.whl: openslide-python, openslide-bin, imagecodecs,
#    defusedxml) into /tmp/site unless they already import, and puts scripts/ on PYTHONPATH;
# 2. prints nvidia-smi, the Python/torch/CUDA versions and /dev/shm (DataLoader workers hand
#    blocks over through it);
# 3. runs the GPU benchmarks through python -m benchmarks.run --only ...: first the CUDA exactness
#    check (gpu_exactness: FCN == patch classifier, single pass == shift-and-stitch in float32 at a
#    slim width), then gpu_slide, gpu_train_throughput and gpu_model (every benchmark named gpu*);
#    WSISCAN_GPU_BENCH_ONLY=name,name runs only those (in that order);
#    WSISCAN_GPU_BENCH_TIMEOUT=seconds limits each benchmark (the JSON is written after each);
# 4. leaves the JSON report and this script's log in $OUT (default benchmarks/results).
# Exit status: 0 when every benchmark ran, 1 otherwise (the JSON says which failed).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

main() {
    echo "== wsiscan GPU check: $(date -u +%FT%TZ) on $(hostname)"
    if ! "$PY" -c "import openslide, imagecodecs, defusedxml" 2>/dev/null; then
        echo "== installing carried wheels into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD/scripts:$PWD${PYTHONPATH:+:$PYTHONPATH}"

    echo "== machine"
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    nproc
    df -h /dev/shm /tmp "$PWD" 2>/dev/null
    # DataLoader workers pass each batch of blocks (4 x 25 MB at full size) through /dev/shm
    shm_kib=$(df -k --output=size /dev/shm 2>/dev/null | tail -n 1 | tr -d ' ')
    if [[ "$shm_kib" =~ ^[0-9]+$ && "$shm_kib" -lt 4194304 && "$(id -u)" == 0 ]]; then
        mount -o remount,size=16G /dev/shm && echo "/dev/shm enlarged to 16G" \
            || echo "warning: /dev/shm is only ${shm_kib} KiB; loader workers may fail"
    fi
    "$PY" - <<'EOF' || exit 1
import sys, torch, openslide, imagecodecs, tifffile, h5py, skimage
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| GPU",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("openslide", openslide.__version__, openslide.__library_version__, "| imagecodecs",
      imagecodecs.__version__, "| tifffile", tifffile.__version__, "| h5py", h5py.__version__,
      "| scikit-image", skimage.__version__)
import wsiscan
print("wsiscan", wsiscan.__version__, "from", wsiscan.__file__)
EOF

    ARGS=(--out "$OUT" --no-readme)
    if [[ -n "${WSISCAN_GPU_BENCH_ONLY:-}" ]]; then
        ARGS+=(--only "${WSISCAN_GPU_BENCH_ONLY}")
    else
        ARGS+=(--only "gpu_exactness,gpu_slide,gpu_train_throughput,gpu_model")
    fi
    if [[ -n "${WSISCAN_GPU_BENCH_TIMEOUT:-}" ]]; then
        ARGS+=(--timeout "${WSISCAN_GPU_BENCH_TIMEOUT}")
    fi
    if [[ "${WSISCAN_GPU_BENCH_SMOKE:-0}" != "0" ]]; then
        ARGS+=(--smoke)
    fi
    echo "== $PY -m benchmarks.run ${ARGS[*]}"
    "$PY" -m benchmarks.run "${ARGS[@]}"
    status=$?
    echo "== reports in $OUT:"
    ls -l "$OUT"
    echo "== done (status $status)"
    return $status
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
