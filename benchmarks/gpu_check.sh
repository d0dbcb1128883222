#!/usr/bin/env bash
# hotloop's GPU check: the whole GPU block of a session lent a GPU, in ONE device call of at most 7 minutes.
#   bash benchmarks/gpu_check.sh [bench options]      on the GPU machine (device tool call; carry: .whl)
#   bash benchmarks/gpu_check.sh --dry-run            anywhere, CI included (HOTLOOP_GPU_CHECK_DRY_RUN=1 too):
#                                                     CPU stand-ins for the GPU parts, the same packing, ~1 minute
# Time: a global budget (HOTLOOP_GPU_CHECK_BUDGET_S, default 420 on the GPU / 300 in a dry run) and a bound per
# step. A step gets its bound, or less: what is left of the budget less the packing reserve less the step's
# SIGKILL grace (timeout -k 10), so even a step that ignores its signal ends before the reserve. The reserve is
# the packing's own bounds, each with its grace: 30+3 (plot) + 15+3 (summary) + 10+3 (tar) + 3 for the rest
# = 67 s. So the whole run ends within the budget (steps by 420-67-1 = 352 s, packing by 419 s, give or take a
# second of unbounded shell work), hung steps included; stopped by a signal, it adds at most 10+3 s to stop its
# steps. 420 s on the GPU leaves, of the session's 15 minutes of device time, the machine's start (1-2 minutes)
# and a partial rerun. The per-step bounds (seconds, GPU / dry run) catch hangs; together (645 s on the GPU) they
# exceed the budget's 353 s for steps, so the benchmarks, last, get what is left, and what they do not get is
# "incomplete", not a failure:
#   wheels        45 /  -   .whl/*.whl (liger-kernel, cut-cross-entropy, trl; ninja for a parallel build) into
#                           /tmp/site, on PYTHONPATH (and /tmp/site/bin on PATH)
#   nvidia-smi    15 /  20
#   ceilings      45 /  60  device-to-device copy bandwidth and dense bf16 matmul rate (dry run: tiny CPU ones)
#   build        180 /  -   pip install -e . with MAX_JOBS=$(nproc), TORCH_CUDA_ARCH_LIST=9.0a; log kept; then
#                30 / 60    the import of hotloop._C. If it does not import, tests / sanitizer / bench are skipped
#                           and the exit is 1 (dry run: no build, the import is checked)
#   tests-N      150 / 120  pytest -k "cuda or triton" (CUDA and Triton backends against CPU / float64
#                           references) in HOTLOOP_GPU_TEST_SHARDS (4) parallel shards by file, junit per shard;
#                           SIGINT at the bound, so pytest still writes its junit (dry run: 2 small files); no
#                           test file to shard is a failed "tests" step
#   sanitizer    150 / 120  benchmarks/sanitizer_cases.py: compute-sanitizer memcheck over one small case per
#                           kernel family and backend, in parallel with the tests; an unsupported sanitizer
#                           ("Device not supported") is recorded, not fatal (dry run: the cases on CPU, plainly)
#   bench-NAME    60 /  90  python -m benchmarks.run --only NAME for each of HOTLOOP_GPU_BENCHES (default, in
#                           order of priority: linear_token_stats token_stats policy_loss) against the peers
#                           without torch.compile; options given to this script go to every bench (e.g. --cases
#                           bf16); dry run: --quick group_advantages policy_loss
#   pack      30+15+10 always  (EXIT trap) summary.md / summary.png (benchmarks.run --summarize), summary.txt
#                           (benchmarks/gpu_check_summary.py), gpu_check.tar.gz; checks $OUT's limits; prints
#                           the summary last (the device tool returns the output's last 12,000 characters)
# $OUT (default /tmp/hotloop_gpu_out) gets 3 files: gpu_check.tar.gz (gpu_check/: steps.tsv, summary.txt, logs/,
# junit/, sanitizer/, results/<device>/*.json|md|png), summary.txt, summary.png.
# Verdict (summary.txt's "result:" line): ok (exit 0) when every step is ok; incomplete (exit 0) when the only
# steps not ok are benchmarks the budget cut (not run for lack of time, or stopped at their bound: named there);
# FAILED (exit 1) otherwise: a build, test shard or sanitizer that failed, timed out or had no time left, a
# benchmark that failed (a wrong hotloop result), $OUT over the device tool's limits.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF=$ROOT/benchmarks/gpu_check.sh
cd "$ROOT"

DRY=${HOTLOOP_GPU_CHECK_DRY_RUN:-0}
BENCH_ARGS=()
for a in "$@"; do
  if [[ $a == --dry-run ]]; then DRY=1; else BENCH_ARGS+=("$a"); fi
done
[[ $DRY == 1 ]] || DRY=0
OUT=${OUT:-/tmp/hotloop_gpu_out}
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ $DRY == 1 && -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1
NPROC=$(nproc 2>/dev/null || echo 2)
if [[ $DRY == 1 ]]; then BUDGET=${HOTLOOP_GPU_CHECK_BUDGET_S:-300}; else BUDGET=${HOTLOOP_GPU_CHECK_BUDGET_S:-420}; fi
KILL_S=10  # a step's SIGKILL grace after its bound's signal (timeout -k), counted in its bound
# the packing (finish): its commands' bounds and their grace; the reserve is their sum plus PACK_REST_S for the
# unbounded rest (cp, find, head / tail of big logs, ls): what the packing can take at most
PACK_PLOT_S=30 PACK_SUMMARY_S=15 PACK_TAR_S=10 PACK_KILL_S=3 PACK_REST_S=3
RESERVE=$(( PACK_PLOT_S + PACK_SUMMARY_S + PACK_TAR_S + 3 * PACK_KILL_S + PACK_REST_S ))  # 67
T0=$SECONDS
STAMP=$(date -u +%Y-%m-%dT%H:%M:%SZ)

mkdir -p "$OUT"
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/hotloop_gpu_check.XXXXXX")
WORK=$STAGE/gpu_check
LOGS=$WORK/logs
mkdir -p "$LOGS" "$WORK/junit" "$WORK/sanitizer" "$WORK/results"
: > "$WORK/steps.tsv"
rm -f "$OUT/gpu_check.tar.gz" "$OUT/summary.txt" "$OUT/summary.png"

# ------------------------------------------------------------------------------------------------ step helpers
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$WORK/steps.tsv"; }

bound() {  # bound MAX [GRACE]: the bound for a command that may run GRACE s (default KILL_S) past it: MAX, or
  # less, so that it ends, grace included, before the budget less the packing reserve is spent (1 s off for the
  # whole-second clock). 0 or less: no time left
  local left=$(( BUDGET - RESERVE - (SECONDS - T0) - ${2:-$KILL_S} - 1 ))
  (( left < $1 )) && echo "$left" || echo "$1"
}

bounded() {  # bounded MAX CMD...: a short command that is not a step (an import check...), under its bound
  local b
  b=$(bound "$1" 2); shift
  (( b >= 1 )) || { echo "not run: no time left in the budget: $*"; return 124; }
  timeout -k 2 "$b" "$@"
}

# run_step [--int] [--bench] NAME MAX LOG CMD...: CMD under `timeout` (SIGINT first with --int, else SIGTERM;
# SIGKILL KILL_S later), stdout + stderr appended to LOG; one line in steps.tsv; returns CMD's exit status (124:
# timed out, 125: not run). --bench: a benchmark, which the budget may cut: not run for lack of time, or stopped at
# its bound, it is "incomplete" (not a failure) instead of "no-time" / "timeout"
run_step() {
  local sig=TERM bench=0
  if [[ $1 == --int ]]; then sig=INT; shift; fi
  if [[ $1 == --bench ]]; then bench=1; shift; fi
  local name=$1 max=$2 log=$3; shift 3
  local b t rc
  b=$(bound "$max")
  if (( b < 5 )); then
    if (( bench )); then record "$name" incomplete 0 "$max" "not run: no time left in the budget"
    else record "$name" no-time 0 "$max" "not run: no time left in the budget"; fi
    echo "skipped: no time left in the budget" >> "$log"
    return 125
  fi
  t=$SECONDS
  echo "\$ $* (bound ${b}s)" >> "$log"
  timeout -s "$sig" -k "$KILL_S" "$b" "$@" >> "$log" 2>&1 &
  local tpid=$!
  echo "$tpid" > "$STAGE/pid.$name"  # for finish, should this script be stopped first
  wait "$tpid"
  rc=$?
  rm -f "$STAGE/pid.$name"
  local why="its bound"
  (( b < max )) && why="${b} s, the budget's rest (its bound: ${max} s)"
  case $rc in
    0) record "$name" ok $((SECONDS - t)) "$b" ;;
    124|137)
      if (( bench )); then record "$name" incomplete $((SECONDS - t)) "$b" "stopped at $why; logs/$(basename "$log")"
      else record "$name" timeout $((SECONDS - t)) "$b" "stopped at $why; logs/$(basename "$log")"; fi ;;
    *) record "$name" failed $((SECONDS - t)) "$b" "exit $rc; logs/$(basename "$log")" ;;
  esac
  return $rc
}

# check_out DIR: the device tool's limits on what comes back: at most 8 files, at most 2 folders deep, names of
# letters / digits / . _ - only, plain files under 16 MiB each
check_out() {
  local dir=$1 bad=0 n
  n=$(find "$dir" -type f | wc -l)
  (( n <= 8 )) || { echo "out check: $n files (at most 8)"; bad=1; }
  if [[ -n $(find "$dir" -mindepth 4 | head -1) ]]; then echo "out check: more than 2 folders deep"; bad=1; fi
  if [[ -n $(find "$dir" -mindepth 1 ! -type f ! -type d | head -1) ]]; then
    echo "out check: something that is not a plain file"; bad=1
  fi
  if [[ -n $(find "$dir" -mindepth 1 -name '*[!A-Za-z0-9._-]*' | head -1) ]]; then echo "out check: bad name"; bad=1; fi
  if [[ -n $(find "$dir" -type f -size +16777215c | head -1) ]]; then echo "out check: a file over 16 MiB"; bad=1; fi
  (( bad == 0 )) && echo "out check: ok ($n files in $dir)"
  return $bad
}

shrink_logs() {  # keep any log under 4 MiB (head 1 MiB + tail 2 MiB), so the archive stays far below 16 MiB
  local f
  while IFS= read -r f; do
    { head -c 1048576 "$f"; printf '\n\n[... cut by gpu_check.sh ...]\n\n'; tail -c 2097152 "$f"; } > "$f.cut" \
      && mv "$f.cut" "$f"
  done < <(find "$WORK" -type f -size +4194304c)
}

# ------------------------------------------------------------------------------------------------------- pack
any_alive() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }

FINISHED=0
COMPLETED=0  # set after the last step: then the exit status is the summary's verdict
finish() {
  local rc=$? t dev
  (( FINISHED )) && return
  FINISHED=1
  (( COMPLETED )) && rc=0
  if (( ! COMPLETED )); then  # stopped early (a signal): stop the steps still running (timeout passes it on)
    local f name names=() pids=() waited=0
    for f in "$STAGE"/pid.*; do
      [[ -f $f ]] || continue
      names+=("${f##*/pid.}")
      pids+=("$(cat "$f")")
      kill -TERM "${pids[-1]}" 2>/dev/null
    done
    while (( waited < KILL_S + 2 )) && any_alive "${pids[@]}"; do sleep 1; waited=$((waited + 1)); done
    sleep 1  # their run_step records them (exit 143); the ones that could not:
    for name in "${names[@]}"; do
      grep -q "^$name"$'\t' "$WORK/steps.tsv" || record "$name" stopped 0 0 "stopped with the script"
    done
    record script stopped $((SECONDS - T0)) "$BUDGET" "stopped by a signal (exit $rc)"
  fi
  trap '' INT TERM
  t=$SECONDS
  # the newest results folder: summary .md / .png over every bench JSON in it
  dev=$(ls -td "$WORK"/results/*/ 2>/dev/null | head -1)
  if [[ -n $dev ]]; then
    local quick=()
    [[ -z $(find "$dev" -maxdepth 1 -name '*.json' ! -name '*_quick.json' | head -1) ]] && quick=(--quick)
    timeout -k "$PACK_KILL_S" "$PACK_PLOT_S" "$PY" -m benchmarks.run --summarize "$dev" "${quick[@]}" \
      > "$LOGS/plot.log" 2>&1 \
      || echo "summarize / plot exited $?" >> "$LOGS/plot.log"
    local png
    png=$(ls "$dev"/summary*.png 2>/dev/null | head -1)
    [[ -n $png ]] && cp "$png" "$OUT/summary.png"
  fi
  record pack ok $((SECONDS - t)) "$RESERVE" "total $((SECONDS - T0)) s"
  local title="hotloop gpu_check$([[ $DRY == 1 ]] && echo ' (DRY RUN: CPU stand-ins)') $STAMP, $(hostname 2>/dev/null)"
  timeout -k "$PACK_KILL_S" "$PACK_SUMMARY_S" "$PY" -m benchmarks.gpu_check_summary "$WORK" --title "$title" \
    > "$LOGS/summary.log" 2>&1 \
    || { echo "$title"; echo "result: FAILED: the summary script (logs/summary.log):"; tail -20 "$LOGS/summary.log"
         cat "$WORK/steps.tsv"; } > "$WORK/summary.txt"
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  shrink_logs
  local check tar_rc=0
  timeout -k "$PACK_KILL_S" "$PACK_TAR_S" tar -C "$STAGE" -czf "$OUT/gpu_check.tar.gz" gpu_check || tar_rc=$?
  check=$(check_out "$OUT") || rc=1
  cat "$WORK/summary.txt"
  (( tar_rc )) && { echo "pack: tar exited $tar_rc: gpu_check.tar.gz is incomplete"; rc=1; }
  echo "$check"
  echo "files: $(cd "$OUT" && ls -l | awk 'NR > 1 {printf "%s (%s B)  ", $NF, $5}')"
  if grep -q '^result: FAILED' "$WORK/summary.txt"; then rc=1; fi
  rm -rf "$STAGE"
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------------------------------------ steps
if [[ $DRY == 1 ]]; then
  if bash -n "$SELF" 2> "$LOGS/bash-n.log"; then record syntax ok 0 0 "bash -n"
  else record syntax failed 0 0 "bash -n: logs/bash-n.log"; fi
fi

# wheels
if [[ $DRY == 1 ]]; then
  whl=$(ls .whl/*.whl 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')
  record wheels dry-run 0 0 "would install: ${whl:-nothing (no .whl/*.whl)}"
elif compgen -G ".whl/*.whl" > /dev/null; then
  run_step wheels 45 "$LOGS/wheels.log" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  [[ -d /tmp/site/bin ]] && export PATH=/tmp/site/bin:$PATH
else
  record wheels skipped 0 45 "no .whl/*.whl carried: peers that are not installed are reported unavailable"
fi

# nvidia-smi
if [[ $DRY == 1 ]]; then T_SMI=20; T_CEIL=60; T_IMPORT=60; else T_SMI=15; T_CEIL=45; T_IMPORT=30; fi
if command -v nvidia-smi > /dev/null; then
  run_step nvidia-smi "$T_SMI" "$LOGS/nvidia-smi.txt" nvidia-smi
else
  echo "nvidia-smi not on PATH" > "$LOGS/nvidia-smi.txt"
  record nvidia-smi "$([[ $DRY == 1 ]] && echo dry-run || echo failed)" 0 "$T_SMI" "not on PATH"
fi

# ceilings
cat > "$WORK/ceilings.py" <<'PYEOF'
import time, torch
if torch.cuda.is_available():
    import triton.testing as tt
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16); y = torch.empty_like(x)
    ms = tt.do_bench(lambda: y.copy_(x), return_mode="median")
    print(f"copy_bandwidth_GBps {2 * x.numel() * 2 / ms / 1e6:.0f}")
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
    ms = tt.do_bench(lambda: a @ b, return_mode="median")
    print(f"bf16_matmul_TFLOPs {2 * 8192**3 / ms / 1e9:.0f}")
    print(f"where cuda, triton.testing.do_bench median")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda}")
else:  # the dry run's stand-in: small CPU tensors, perf_counter
    def best(fn, n=5):
        fn(); ts = []
        for _ in range(n):
            t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        return min(ts) * 1e3
    x = torch.randn(1 << 24, dtype=torch.bfloat16); y = torch.empty_like(x)
    print(f"copy_bandwidth_GBps {2 * x.numel() * 2 / best(lambda: y.copy_(x)) / 1e6:.1f}")
    a = torch.randn(512, 512, dtype=torch.bfloat16); b = torch.randn_like(a)
    print(f"bf16_matmul_TFLOPs {2 * 512**3 / best(lambda: a @ b) / 1e9:.3f}")
    print(f"where cpu stand-in ({torch.get_num_threads()} threads)")
    print(f"device cpu, torch {torch.__version__}")
PYEOF
run_step ceilings "$T_CEIL" "$LOGS/ceilings.txt" "$PY" "$WORK/ceilings.py"

# build
BUILT=0
if [[ $DRY == 1 ]]; then
  if bounded "$T_IMPORT" "$PY" -c "import hotloop._C, hotloop._internal.extension as e
print('hotloop._C: imports; cuda kernels built:', e.has_cuda_kernels())" >> "$LOGS/build.log" 2>&1; then
    BUILT=1; record build dry-run 0 0 "no build in a dry run; hotloop._C imports"
  else
    record build failed 0 0 "dry run: hotloop._C does not import (build it: scripts/setup_env.sh) or timed out"
  fi
else
  {
    echo "nproc $NPROC; ninja: $(command -v ninja || echo 'not on PATH (the build falls back to one job at a time)')"
    command -v nvcc > /dev/null && bounded 10 nvcc --version | tail -2
  } >> "$LOGS/build.log" 2>&1
  MAX_JOBS=${MAX_JOBS:-$NPROC} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} PIP_BREAK_SYSTEM_PACKAGES=1 \
    run_step build 180 "$LOGS/build.log" "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .
  if bounded "$T_IMPORT" "$PY" -c "import hotloop._C, hotloop._internal.extension as e; print('cuda kernels built:',
       e.has_cuda_kernels())" >> "$LOGS/build.log" 2>&1; then
    BUILT=1
    if ! grep -q '^cuda kernels built: True' "$LOGS/build.log"; then
      record build-cuda failed 0 0 "hotloop._C imports but has no CUDA kernels (see logs/build.log)"
    fi
  else
    tail -40 "$LOGS/build.log"
    record build-import failed 0 "$T_IMPORT" \
      "hotloop._C does not import (or timed out; logs/build.log): tests, sanitizer and benchmarks skipped"
  fi
fi

if (( BUILT )); then
  # tests (shards, in the background) and the sanitizer, at the same time
  if [[ $DRY == 1 ]]; then
    SHARDS=${HOTLOOP_GPU_TEST_SHARDS:-2}; T_TESTS=120; T_SAN=120
    TEST_FILES=${HOTLOOP_GPU_TEST_FILES:-tests/test_ema.py tests/test_byol_loss.py}
  else
    SHARDS=${HOTLOOP_GPU_TEST_SHARDS:-4}; T_TESTS=150; T_SAN=150
    # every test file but the CPU-side tools' (the compile matrix, the benchmarks' smoke run, the examples, this
    # script's dry run); -k picks the CUDA / Triton tests inside them
    EXCLUDE=${HOTLOOP_GPU_TEST_EXCLUDE:-test_triton_compile_matrix.py test_gpu_check_dry_run.py \
      test_benchmarks_smoke.py test_examples.py}
    TEST_FILES=${HOTLOOP_GPU_TEST_FILES:-$(for f in tests/test_*.py; do
      [[ " $EXCLUDE " == *" ${f##*/} "* ]] || printf '%s ' "$f"; done)}
  fi
  # greedy split by file size (largest first onto the lightest shard); no shard (no file, a missing one, the
  # snippet crashed or had no time): a failed "tests" step, never a run without tests
  # shellcheck disable=SC2086
  bounded 20 "$PY" - "$SHARDS" $TEST_FILES > "$STAGE/shards" 2> "$LOGS/shards.log" <<'PYEOF'
import os, sys
n, files = int(sys.argv[1]), sys.argv[2:]
shards = [[0, []] for _ in range(max(1, min(n, len(files))))]
for f in sorted(files, key=os.path.getsize, reverse=True):
    s = min(shards, key=lambda s: s[0]); s[0] += os.path.getsize(f); s[1].append(f)
for _, fs in shards:
    if fs:
        print(" ".join(fs))
PYEOF
  SHARD_RC=$?
  SHARD_FILES=()
  (( SHARD_RC == 0 )) && mapfile -t SHARD_FILES < <(grep -v '^[[:space:]]*$' "$STAGE/shards")
  if (( ${#SHARD_FILES[@]} == 0 )); then
    echo "test files: ${TEST_FILES:-none}" >> "$LOGS/shards.log"
    record tests failed 0 0 "no test file to run (sharding exited $SHARD_RC; logs/shards.log)"
  fi
  THREADS=$(( NPROC / (${#SHARD_FILES[@]} + 1) )); (( THREADS < 1 )) && THREADS=1
  pids=()
  for i in "${!SHARD_FILES[@]}"; do
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=$THREADS run_step --int "tests-$i" "$T_TESTS" "$LOGS/tests-$i.log" "$PY" -m pytest -q \
      -p no:cacheprovider -k "cuda or triton" -rfE --durations=10 --continue-on-collection-errors \
      --junitxml="$WORK/junit/tests-$i.xml" ${SHARD_FILES[$i]} &
    pids+=($!)
  done
  if [[ $DRY == 1 ]]; then
    SAN=(--device cpu --sanitizer none)  # no GPU: the driver and its report, without the sanitizer
  else
    SAN=(--device cuda)
  fi
  SAN_B=$(bound "$T_SAN")  # its own deadline a little before the step's bound: it writes its report itself
  SAN_MARGIN=$(( SAN_B / 5 < 3 ? 3 : (SAN_B / 5 > 10 ? 10 : SAN_B / 5) ))
  run_step sanitizer "$T_SAN" "$LOGS/sanitizer-step.log" "$PY" benchmarks/sanitizer_cases.py --run \
    --out "$WORK/sanitizer" --timeout $(( SAN_B - SAN_MARGIN )) "${SAN[@]}" &
  pids+=($!)
  wait "${pids[@]}"
  # pytest's exit 5: that shard selected no test
  sed -i -E 's/^(tests-[0-9]+)\tfailed\t([0-9]+)\t([0-9]+)\texit 5;.*/\1\tok\t\2\t\3\tno test selected/' \
    "$WORK/steps.tsv"
  # the sanitizer exits 0 when unsupported (recorded, not a failure) or incomplete (its time ran out before every
  # case ran: a failure, recorded as a timeout)
  if grep -qs '"status": "unsupported"' "$WORK/sanitizer/sanitizer.json"; then
    sed -i -E 's/^sanitizer\tok\t/sanitizer\tunsupported\t/' "$WORK/steps.tsv"
  elif grep -qs '"status": "incomplete"' "$WORK/sanitizer/sanitizer.json"; then
    note="its --timeout ran out before every case ran (sanitizer.json)"
    sed -i -E "s/^sanitizer\tok\t([0-9]+)\t([0-9]+)\t.*/sanitizer\ttimeout\t\1\t\2\t$note/" "$WORK/steps.tsv"
  fi

  # benchmarks, one bench per call so that each has its own bound; the peers without torch.compile (cold
  # compiles would take the whole budget). What the budget cuts is "incomplete", named in the summary's result
  if [[ $DRY == 1 ]]; then
    BENCHES=${HOTLOOP_GPU_BENCHES:-group_advantages policy_loss}; T_BENCH=90; BENCH_ARGS=(--quick "${BENCH_ARGS[@]}")
  else
    BENCHES=${HOTLOOP_GPU_BENCHES:-linear_token_stats token_stats policy_loss}
    T_BENCH=60
  fi
  for name in $BENCHES; do
    case $name in
      token_stats) prov=(--providers eager,trl,liger,flash_attn,hotloop,hotloop_inplace) ;;
      linear_token_stats) prov=(--providers eager,liger_flce,liger_chunked,cce) ;;
      policy_loss) prov=(--providers trl_materialised,liger) ;;
      preference_loss) prov=(--providers trl_materialised,trl_fused_lm_head,liger) ;;
      train_step) prov=(--providers trl_materialised,trl_fused_head) ;;
      *) prov=() ;;
    esac
    [[ $DRY == 1 ]] && prov=()
    run_step --bench "bench-$name" "$T_BENCH" "$LOGS/bench-$name.log" "$PY" -m benchmarks.run --only "$name" \
      --no-plot --out-dir "$WORK/results" "${prov[@]}" "${BENCH_ARGS[@]}"
  done
else
  record tests skipped 0 0 "no hotloop._C"
  record sanitizer skipped 0 0 "no hotloop._C"
  record bench skipped 0 0 "no hotloop._C"
fi
COMPLETED=1
# finish (the EXIT trap) packs, checks $OUT and prints the summary
