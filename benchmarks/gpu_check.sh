#!/usr/bin/env bash
# One-shot GPU check of the TensorRT export path (TensorRT 10.x / 11.x, strongly typed builds).
#
#   bash benchmarks/gpu_check.sh            # on a machine with an NVIDIA GPU
#
# 1. uses (or creates) a venv and installs  -c constraints.txt -e '.[dev,tensorrt,gpu]'
# 2. runs the GPU/TensorRT tests            pytest -m "gpu or tensorrt"
# 3. trains a tiny built-in student         kdcompress train --recipe digits --role student --steps 50
# 4. builds verified fp16 and int8 engines  kdcompress export --to tensorrt --precision fp16|int8
#    at 512x1024 and 1024x2048
# 5. profiles torch / ORT-CUDA / TensorRT   kdcompress profile ... --json  at both sizes
#
# Everything lands in benchmarks/results/gpu_check/ (one JSON per step + summary.json). Every step
# has a timeout and the whole run has a budget (BUDGET_S, default 470 s, i.e. under 8 minutes):
# a step that would not fit is skipped and recorded as such. A failing step is recorded and the
# run goes on; the exit code is non-zero if any step failed.
#
# Environment knobs: VENV (default .venv), BUDGET_S (470), STEPS (50), SKIP_INSTALL=1 (never pip),
# FORCE_INSTALL=1 (pip even when kdcompress + tensorrt already import), SIZES ("512x1024 1024x2048"),
# PRECISIONS ("fp16 int8").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
BUDGET_S=${BUDGET_S:-470}
STEPS=${STEPS:-50}
SIZES=${SIZES:-"512x1024 1024x2048"}
PRECISIONS=${PRECISIONS:-"fp16 int8"}
OUT=benchmarks/results/gpu_check
RUN=runs/gpu-check
START=$(date +%s)
FAILED=()
STATUS_FILE=$OUT/steps.tsv

mkdir -p "$OUT" "$RUN"
: >"$STATUS_FILE"
export KDCOMPRESS_CACHE=${KDCOMPRESS_CACHE:-$ROOT/$RUN/cache}
export PYTHONUNBUFFERED=1

log() { printf '\n== [%s +%ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - START))" "$*" >&2; }
remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

# step NAME TIMEOUT_S OUTFILE|- CMD...: run CMD under a timeout capped by the remaining budget.
# stdout goes to OUTFILE (JSON producers) or the log; status is recorded in steps.tsv.
step() {
  local name=$1 limit=$2 outfile=$3
  shift 3
  local left
  left=$(remaining)
  if ((left < 15)); then
    log "SKIP $name (budget: ${left}s left)"
    printf '%s\tskipped\t0\tbudget exhausted\n' "$name" >>"$STATUS_FILE"
    return 0
  fi
  ((limit > left - 5)) && limit=$((left - 5))
  log "$name (timeout ${limit}s): $*"
  local t0 rc=0
  t0=$(date +%s)
  if [[ $outfile == - ]]; then
    timeout --kill-after=10 "$limit" "$@" || rc=$?
  else
    timeout --kill-after=10 "$limit" "$@" >"$outfile" || rc=$?
  fi
  local dt=$(($(date +%s) - t0))
  if ((rc == 0)); then
    printf '%s\tok\t%s\t\n' "$name" "$dt" >>"$STATUS_FILE"
  else
    local why="exit $rc"
    ((rc == 124 || rc == 137)) && why="timeout after ${limit}s"
    log "FAILED $name ($why)"
    printf '%s\tfailed\t%s\t%s\n' "$name" "$dt" "$why" >>"$STATUS_FILE"
    FAILED+=("$name")
  fi
  return 0
}

log "GPU"
if ! timeout 20 nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv; then
  echo "error: no NVIDIA GPU visible (nvidia-smi failed); this check needs a CUDA machine." >&2
  exit 2
fi

# ---- 1. venv + install ---------------------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
  log "creating venv $VENV"
  timeout 60 python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
KD=$VENV/bin/kdcompress
if [[ ${SKIP_INSTALL:-0} == 1 ]]; then
  log "SKIP_INSTALL=1: using $VENV as it is"
elif [[ ${FORCE_INSTALL:-0} != 1 ]] && [[ -x $KD ]] && timeout 60 "$PY" -c "import kdcompress.export, tensorrt, pytest_timeout" 2>/dev/null; then
  log "kdcompress + tensorrt already importable in $VENV (FORCE_INSTALL=1 to reinstall)"
else
  step install 240 - "$PY" -m pip install -q -c constraints.txt -e '.[dev,tensorrt,gpu]'
fi

step versions 60 "$OUT/versions.json" "$PY" - <<'EOF'
import json, platform
import onnxruntime, torch
from kdcompress.export.tensorrt import import_tensorrt, tensorrt_distributions, trt_version_installed
trt = import_tensorrt()  # the version guard: exit 4 with one line on an unsupported major
info = {
    "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name(0), "compute_capability": "%d.%d" % torch.cuda.get_device_capability(0),
    "tensorrt_module": trt.__version__, "tensorrt_installed": trt_version_installed(),
    "tensorrt_distributions": tensorrt_distributions(),
    "onnxruntime": onnxruntime.__version__, "ort_providers": onnxruntime.get_available_providers(),
}
print(json.dumps(info, indent=2))
EOF
cat "$OUT/versions.json" >&2 || true

# ---- 2. GPU / TensorRT tests ---------------------------------------------------------------------
step pytest_gpu 150 - "$PY" -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider --timeout 120 \
  --junitxml "$OUT/pytest_gpu.xml" tests/gpu
# the no-TensorRT checks (version guard, Q/DQ graph, API list) once more, next to a real TensorRT
step pytest_trt_unit 60 - "$PY" -m pytest -q -p no:cacheprovider --timeout 60 \
  --junitxml "$OUT/pytest_trt_unit.xml" tests/unit/test_export_tensorrt.py tests/unit/test_trt_qdq.py

# ---- 3. a tiny student ---------------------------------------------------------------------------
CKPT=$RUN/student/model.pt
step train 90 - "$KD" train --recipe digits --role student --steps "$STEPS" --pretrained none \
  --out "$RUN/student" --force --no-progress
if [[ ! -f $CKPT ]]; then
  log "no checkpoint at $CKPT: cannot export or profile"
  FAILED+=("train: no checkpoint")
fi

ORT_CUDA=0
if "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" 2>/dev/null; then
  ORT_CUDA=1
else
  log "ONNX Runtime has no CUDAExecutionProvider here: ORT-CUDA profiles are skipped"
fi

# ---- 4 + 5. engines and profiles per size ---------------------------------------------------------
for size in $SIZES; do
  [[ -f $CKPT ]] || break
  dir=$RUN/s$size
  mkdir -p "$dir"
  engines=()
  for prec in $PRECISIONS; do
    engine=$dir/student.$prec.engine
    # verification is kept small (2 parity images, 4 mIoU images) so the run fits its budget
    step "export_${prec}_${size}" 150 "$OUT/export_${prec}_${size}.json" \
      "$KD" export "$CKPT" --to tensorrt --precision "$prec" --input-size "$size" --out "$engine" \
      --verify-images 2 --max-eval-images 4 --calib-images 8 --workspace-mb 4096 --json
    [[ -f $engine ]] && engines+=("$engine")
  done
  step "profile_torch_${size}" 60 "$OUT/profile_torch_${size}.json" \
    "$KD" profile "$CKPT" --backend torch --device cuda --input-size "$size" --warmup 5 --iters 30 --json
  onnx=$dir/model.onnx  # the verified fp32 ONNX the engines were built from (<checkpoint stem>.onnx)
  if ((ORT_CUDA)) && [[ -f $onnx ]]; then
    step "profile_ort_cuda_${size}" 60 "$OUT/profile_ort_cuda_${size}.json" \
      "$KD" profile "$onnx" --backend ort --device cuda --input-size "$size" --warmup 5 --iters 30 --json
  fi
  if ((${#engines[@]})); then
    step "profile_tensorrt_${size}" 60 "$OUT/profile_tensorrt_${size}.json" \
      "$KD" profile "${engines[@]}" --device cuda --input-size "$size" --warmup 5 --iters 30 --json
  fi
done

# ---- summary -------------------------------------------------------------------------------------
"$PY" - "$OUT" "$STATUS_FILE" "$(($(date +%s) - START))" <<'EOF' || true
import json, sys
from pathlib import Path

out, status_file, elapsed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
steps = []
for line in status_file.read_text().splitlines():
    name, status, secs, why = (line.split("\t") + ["", "", "", ""])[:4]
    steps.append({"step": name, "status": status, "seconds": int(secs or 0), "detail": why})
latency = {}
for f in sorted(out.glob("profile_*.json")):
    try:
        rows = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        continue
    for r in rows:
        key = f"{r.get('backend')}:{Path(str(r.get('target'))).name}:{'x'.join(map(str, r.get('input_size', [])))}"
        latency[key] = {"median_ms": (r.get("latency_ms") or {}).get("median_ms"), "fps": r.get("fps"),
                        "precision": r.get("precision"), "memory_mb": r.get("memory_mb")}
exports = {}
for f in sorted(out.glob("export_*.json")):
    try:
        r = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        continue
    exports[f.stem] = {"argmax_agreement": r.get("parity", {}).get("argmax_agreement"), "miou_drop": r.get("drop")}
summary = {"elapsed_s": elapsed, "steps": steps, "exports": exports, "latency": latency}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF

log "done in $(($(date +%s) - START)) s; results in $OUT/"
if ((${#FAILED[@]})); then
  echo "failed steps: ${FAILED[*]}" >&2
  exit 1
fi
