#!/usr/bin/env bash
# One prepared run that validates and measures fastcurv natively on a GPU machine (H100/H200), in about
# 10 minutes, with whatever torch/triton the machine has (no installs; at most an editable install of this
# checkout without dependencies).
#
#   bash bench/gpu_check.sh [RESULTS_DIR]        # default: bench/results/gpu_check
#
# Steps, in this order, each time-boxed with `timeout` and writing under RESULTS_DIR even when a later step
# fails (a failing or timed-out step never stops the next one):
#   0. versions (python, torch, triton, numpy, CUDA, driver) and the device name        -> env.json
#   1. pytest tests/kernels tests/test_ops_compile.py natively (gpu_only tests included) -> 1_kernels.*
#   2. the optimizers' parity and compile tests (tests/optim, selected)                 -> 2_optim.*
#   3. kernel benchmarks: time, GB/s or TFLOP/s, % of peak, ratios to the eager reference
#      and to torch.compile of it                                                       -> 3_bench_kernels.*
#   4. optimizer step time against torch.optim.AdamW(fused=True), if bench/test_bench_step.py
#      exists                                                                            -> 4_bench_step.*
#   5. fastcurv compare on the default problem with a short budget (PNG + JSON)         -> 5_compare/
# then steps.tsv (status and seconds of each step) and summary.json (all of it, device named in it), also
# written as bench/results/<device>.json on a GPU.
#
# On a machine without CUDA it degrades instead of failing: the kernel tests run under Triton's CPU
# interpreter (gpu_only tests skip), benchmarks run once as smoke tests (--benchmark-disable) and compare
# runs on the CPU; the time boxes are the same, so a step that outgrows its box there is recorded as
# "timeout" and the run goes on. Time boxes can be changed with T0..T5 (seconds).
set -u
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"  # derandomised, 12 examples per property
export PYTHONDONTWRITEBYTECODE=1
T0="${T0:-60}" T1="${T1:-180}" T2="${T2:-100}" T3="${T3:-140}" T4="${T4:-80}" T5="${T5:-120}"
printf 'step\tstatus\trc\tseconds\tlimit_s\n' > "$OUT/steps.tsv"

# run NAME LIMIT CMD...: time-boxed, stdout+stderr to $OUT/NAME.log, one line in steps.tsv
run() {
  local name="$1" limit="$2"
  shift 2
  local t0 rc status ms
  t0=$(date +%s%N)
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout --kill-after=15 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    5) status=no-tests ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  ms=$((($(date +%s%N) - t0) / 1000000))
  printf '%s\t%s\t%s\t%d.%03d\t%s\n' "$name" "$status" "$rc" $((ms / 1000)) $((ms % 1000)) "$limit" >> "$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.log"
}

# fastcurv must import from this checkout; an editable install without dependencies at most
if ! "$PY" -c "import fastcurv" > /dev/null 2>&1; then
  "$PY" -m pip install -e . --no-deps --no-build-isolation > "$OUT/install.log" 2>&1 || echo "editable install failed (see install.log)"
fi

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2> /dev/null || echo 0)
if [ "$CUDA" = 1 ]; then
  BENCH_FLAGS=()
  DEVICE=cuda
else
  BENCH_FLAGS=(--benchmark-disable)  # CPU: smoke only, nothing is timed
  DEVICE=cpu
fi
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)

# 0. versions and device
run 0_env "$T0" "$PY" - "$OUT/env.json" << 'EOF'
import json, platform, subprocess, sys
import numpy, torch
try:
    import triton
    tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"unavailable: {e}"
env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
       "triton": tv, "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available(),
       "torch_cuda": torch.version.cuda, "allow_tf32": torch.backends.cuda.matmul.allow_tf32}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
               sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001
        env["nvidia_smi"] = f"unavailable: {e}"
else:
    env["device"] = f"cpu ({platform.processor() or platform.machine()})"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
EOF

# 1. kernel tests natively (gpu_only included)
run 1_kernels "$T1" "${PYTEST[@]}" tests/kernels tests/test_ops_compile.py --junitxml="$OUT/1_kernels.xml"

# 2. optimizer parity and compile tests
run 2_optim "$T2" "${PYTEST[@]}" tests/optim -k "parity or compile" --junitxml="$OUT/2_optim.xml"

# 3. kernel benchmarks
run 3_bench_kernels "$T3" "${PYTEST[@]}" bench/test_bench_kron_factor.py bench/test_bench_bfgs.py \
  bench/test_bench_complex_linear.py ${BENCH_FLAGS[@]+"${BENCH_FLAGS[@]}"} --benchmark-json="$OUT/3_bench_kernels.json"

# 4. optimizer step time against AdamW(fused=True)
if [ -f bench/test_bench_step.py ]; then
  run 4_bench_step "$T4" "${PYTEST[@]}" bench/test_bench_step.py ${BENCH_FLAGS[@]+"${BENCH_FLAGS[@]}"} --benchmark-json="$OUT/4_bench_step.json"
else
  printf '4_bench_step\tskipped\t-\t0\t%s\n' "$T4" >> "$OUT/steps.tsv"
  echo "== 4_bench_step skipped: bench/test_bench_step.py is not in this checkout" | tee "$OUT/4_bench_step.log"
fi

# 5. the optimizer comparison, short budget (on a CPU: two optimizers on a small training set, a smoke test)
if [ "$DEVICE" = cuda ]; then
  COMPARE=(--budget-seconds 6 --evals 5)
else
  COMPARE=(--optimizers adam,kfac --budget-seconds 2 --evals 2 --n-train 2000 --n-test 1000 --eval-size 500)
fi
run 5_compare "$T5" "$PY" -m fastcurv.cli compare "${COMPARE[@]}" --device "$DEVICE" --no-progress --out "$OUT/5_compare"

# summary: everything above in one JSON, named by the device
"$PY" - "$OUT" << 'EOF'
import csv, json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"env": {}, "steps": [], "benchmarks": {}}
if (out / "env.json").exists():
    summary["env"] = json.loads((out / "env.json").read_text())
with open(out / "steps.tsv") as f:
    summary["steps"] = list(csv.DictReader(f, delimiter="\t"))
for name in ("3_bench_kernels", "4_bench_step"):
    p = out / f"{name}.json"
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):  # absent, or cut short by the time box
        data = None
    if data is not None:
        summary["benchmarks"][name] = [
            {"name": b["name"], "median_s": b["stats"]["median"], **b.get("extra_info", {})} for b in data.get("benchmarks", [])
        ]
for name in ("1_kernels", "2_optim"):
    log = out / f"{name}.log"
    if log.exists():
        tail = [line for line in log.read_text().splitlines() if re.search(r"\b(passed|failed|error)", line)]
        summary[f"{name}_result"] = tail[-1] if tail else None
compare = sorted((out / "5_compare").glob("*.json")) if (out / "5_compare").exists() else []
summary["compare_files"] = [str(p) for p in compare] + [str(p) for p in sorted((out / "5_compare").glob("*.png"))] if compare else []
device = summary["env"].get("device", "unknown")
slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_") or "unknown"
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
(out / f"{slug}.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"wrote {out}/summary.json and {out}/{slug}.json")
if summary["env"].get("cuda_available"):  # the file to commit: bench/results/<device>.json
    Path("bench/results", f"{slug}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote bench/results/{slug}.json (commit it with git add -f: results/ is git-ignored)")
EOF
echo
column -t -s $'\t' "$OUT/steps.tsv" 2> /dev/null || cat "$OUT/steps.tsv"
