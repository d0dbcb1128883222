#!/usr/bin/env bash
# Build the whole extension hotloop._C (C++ and CUDA kernels, csrc/cuda/*.cu and csrc/bindings/*_cuda.cpp)
# against a CUDA build of torch, on a machine without a GPU, then import it and check that every CUDA kernel is
# registered (scripts/check_cuda_registrations.py). Called by scripts/test.sh; also runs alone.
#   1. venv (made once, cached outside the repo, reused by later runs and fresh clones on this machine):
#      $HOTLOOP_CACHE (default ~/.cache/hotloop)/cuda-torch-<torch>-py<XY>: PyPI's CUDA wheel of torch (the
#      release of requirements/constraints.txt, or HOTLOOP_CUDA_TORCH) with torch's own pinned CUDA libraries,
#      which `import torch` needs; torch's triton and cuda-bindings are left out (neither building _C nor
#      importing it uses them). About 4 GiB, 0.6 GiB of it downloaded.
#   2. build: setup.py build_py + build_ext into build/cuda-check/ (gitignored; the in-place CPU _C in
#      python/hotloop/ is left alone), TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), MAX_JOBS (default 2). Compiles
#      go through ccache (installed with apt-get when missing, best effort) keyed on content, with its cache in
#      $HOTLOOP_CACHE/ccache, so an unchanged tree rebuilds from the cache even in a fresh clone elsewhere.
#      Compiler warnings in hotloop's sources fail the check (HOTLOOP_CUDA_BUILD_WERROR=0: report them only).
#   3. import with the venv's python and check the registrations.
# Prints the time of each step. No nvcc (neither $NVCC, nor on PATH, nor $CUDA_HOME/bin/nvcc): says so and exits
# 0, unless HOTLOOP_REQUIRE_CUDA_BUILD=1 (then exit 1).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-2}
CACHE=${HOTLOOP_CACHE:-$HOME/.cache/hotloop}
OUT=$ROOT/build/cuda-check
LOG=$OUT/build.log
t_start=$(date +%s.%N)

say() { echo "cuda_build_check: $*"; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
fail() { say "FAILED: $*" >&2; exit 1; }

# --- nvcc and CUDA_HOME ---------------------------------------------------------------------------------------
nvcc_bin=${NVCC:-}
if [[ -z "$nvcc_bin" ]]; then
  if command -v nvcc > /dev/null 2>&1; then
    nvcc_bin=$(command -v nvcc)
  elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    nvcc_bin=$CUDA_HOME/bin/nvcc
  fi
fi
if [[ -z "$nvcc_bin" ]] || ! command -v "$nvcc_bin" > /dev/null 2>&1; then
  if [[ "${HOTLOOP_REQUIRE_CUDA_BUILD:-0}" == "1" ]]; then
    fail "nvcc not found and HOTLOOP_REQUIRE_CUDA_BUILD=1"
  fi
  say "nvcc not found, skipping the CUDA build check (HOTLOOP_REQUIRE_CUDA_BUILD=1 makes this an error)"
  exit 0
fi
# torch looks for the toolkit at dirname(dirname(nvcc)), wrong when nvcc is a wrapper script or a symlink
# (/usr/local/bin/nvcc): ask nvcc where it lives.
if [[ -z "${CUDA_HOME:-}" || ! -f "${CUDA_HOME}/include/cuda_runtime.h" ]]; then
  here=$("$nvcc_bin" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
  CUDA_HOME=$(cd "${here:-$(dirname "$nvcc_bin")}/.." && pwd)
fi
[[ -f "$CUDA_HOME/include/cuda_runtime.h" ]] || fail "no include/cuda_runtime.h under CUDA_HOME=$CUDA_HOME"
export CUDA_HOME
say "nvcc $("$nvcc_bin" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_HOME=$CUDA_HOME"

# --- 1. the CUDA torch venv (cached) --------------------------------------------------------------------------
TORCH=${HOTLOOP_CUDA_TORCH:-$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' requirements/constraints.txt | head -n 1)}
[[ -n "$TORCH" ]] || fail "no torch==X.Y.Z in requirements/constraints.txt (set HOTLOOP_CUDA_TORCH)"
PYTAG=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
VENV=$CACHE/cuda-torch-$TORCH-py$PYTAG
VPY=$VENV/bin/python
mkdir -p "$CACHE"
exec 9> "$CACHE/cuda-torch.lock"
if command -v flock > /dev/null 2>&1; then flock 9; fi  # one maker at a time; the others wait, then reuse it
t0=$(date +%s.%N)
if [[ -f "$VENV/.hotloop-complete" ]]; then
  say "venv: cached $VENV ($(head -n 1 "$VENV/.hotloop-complete"))"
else
  say "venv: making $VENV (once per machine)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  dl=$(mktemp -d "$CACHE/download.XXXXXX")
  # --isolated: pip's config here has find-links holding the CPU wheel torch-X+cpu, which would win for torch==X;
  # PyPI's plain torch-X wheel for Linux x86_64 is the CUDA build
  cert=()
  [[ -n "${PIP_CERT:-}" ]] && cert=(--cert "$PIP_CERT")
  t1=$(date +%s.%N)
  pipv() { "$VPY" -m pip "$@" >> "$CACHE/pip.log" 2>&1 || { tail -n 30 "$CACHE/pip.log" >&2; return 1; }; }
  : > "$CACHE/pip.log"
  pipv download --isolated --disable-pip-version-check "${cert[@]}" --no-deps --no-cache-dir \
    --only-binary=:all: -d "$dl" "torch==$TORCH" || fail "could not download torch==$TORCH from PyPI"
  whl=$(ls "$dl"/torch-*.whl)
  [[ "$(basename "$whl")" != *+* ]] || fail "PyPI gave a local-tagged wheel $(basename "$whl"), not the CUDA build"
  say "  download $(basename "$whl") ($(du -m "$whl" | cut -f1) MiB): $(since "$t1") s"
  t1=$(date +%s.%N)
  pipv install --no-deps "$whl" || fail "could not install $whl (log: $CACHE/pip.log)"
  rm -rf "$dl"
  say "  install torch: $(since "$t1") s"
  # torch's own requirements (exact CUDA library pins) minus the two that neither the build nor the import needs
  t1=$(date +%s.%N)
  mapfile -t deps < <("$VPY" - <<'EOF'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement

for req in map(Requirement, requires("torch")):
    if req.name in ("triton", "cuda-bindings") or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}{req.specifier}")
EOF
  )
  # (pip then reports triton and cuda-bindings as missing: expected)
  pipv install "${deps[@]}" ninja numpy || fail "could not install torch's dependencies (log: $CACHE/pip.log)"
  say "  install torch's CUDA libraries and deps (${#deps[@]}: ${deps[*]}): $(since "$t1") s"
  built=$("$VPY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")') \
    || fail "torch from $whl does not import"
  [[ "$built" != *"CUDA None" ]] || fail "the torch in $VENV has no CUDA ($built)"
  { echo "$built"; "$VPY" -m pip freeze; } > "$VENV/.hotloop-complete"
  say "venv: made in $(since "$t0") s ($(du -sm "$VENV" | cut -f1) MiB)"
fi
exec 9>&-
t_venv=$(since "$t0")

# --- 2. build -------------------------------------------------------------------------------------------------
t0=$(date +%s.%N)
if ! command -v ccache > /dev/null 2>&1; then
  # best effort: the build is the same without it, only slower every time
  if [[ $(id -u) == 0 ]] && command -v apt-get > /dev/null 2>&1; then
    say "installing ccache (apt-get)"
    t1=$(date +%s.%N)
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get install -y -q --no-install-recommends ccache > "$CACHE/apt-ccache.log" 2>&1 \
      || { timeout 300 apt-get update -q >> "$CACHE/apt-ccache.log" 2>&1 \
           && timeout 300 apt-get install -y -q --no-install-recommends ccache >> "$CACHE/apt-ccache.log" 2>&1; } \
      || say "  apt-get could not install ccache (see $CACHE/apt-ccache.log); building without it"
    say "  apt-get: $(since "$t1") s"
  fi
fi
ccache_on=0
if command -v ccache > /dev/null 2>&1; then
  ccache_on=1
  # torch's BuildExtension puts ccache in front of c++ and nvcc by itself when it is on PATH. Content keys:
  # paths under the clone become relative (the build dir is inside it) and the cwd is not hashed, so a fresh
  # clone in another directory hits the cache.
  export CCACHE_DIR=$CACHE/ccache CCACHE_BASEDIR=$ROOT CCACHE_NOHASHDIR=1
  export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-3G}
  ccache --zero-stats > /dev/null
else
  say "no ccache: every run compiles everything"
fi
stamp() { sha1sum python/hotloop/_C*.so python/hotloop/_build_info.py 2> /dev/null || true; }
before=$(stamp)
rm -rf "$OUT/lib"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
say "build: setup.py build_py build_ext -> build/cuda-check/lib (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST," \
    "MAX_JOBS=$MAX_JOBS)"
if ! "$VPY" setup.py build_py --build-lib "$OUT/lib" build_ext --build-lib "$OUT/lib" --build-temp "$OUT/temp" \
     > "$LOG" 2>&1; then
  grep -E "error|FAILED" "$LOG" | head -n 40 >&2 || true
  tail -n 30 "$LOG" >&2
  fail "the CUDA build of hotloop._C failed (full log: $LOG)"
fi
[[ "$(stamp)" == "$before" ]] || fail "the CUDA build touched the in-place CPU build in python/hotloop/"
# compiler / assembler / linker diagnostics, except those located in torch's or CUDA's own headers
diagnostic="^[^[:space:]]+:[0-9]+(:[0-9]+)?: warning"              # gcc: file:line:col: warning
diagnostic+="|^[^[:space:]]+\([0-9]+\): warning"                  # nvcc front end: file(line): warning #N-D
diagnostic+="|^(ptxas|nvlink|nvcc|fatbinary) warning|ld: warning"  # assembler, device and host linkers
warnings=$(grep -E "$diagnostic" "$LOG" | grep -v -e "/site-packages/" -e "^$CUDA_HOME/" | sort -u || true)
hits=""
if (( ccache_on )); then
  hits=$(ccache --print-stats 2> /dev/null | awk '
    $1 == "direct_cache_hit" || $1 == "preprocessed_cache_hit" { hit += $2 }
    $1 == "cache_miss" { miss += $2 }
    END { printf ", ccache: %d hits, %d misses", hit, miss }')
fi
t_build=$(since "$t0")
say "build: $t_build s ($(grep -cE '^\[[0-9]+/[0-9]+\]' "$LOG" || true) ninja compile steps$hits)"
if [[ -n "$warnings" ]]; then
  echo "$warnings" | sed 's/^/    /'
  if [[ "${HOTLOOP_CUDA_BUILD_WERROR:-1}" == "1" ]]; then
    fail "$(echo "$warnings" | wc -l) compiler warning(s) in hotloop's sources (full log: $LOG)"
  fi
fi

# --- 3. import and registrations ------------------------------------------------------------------------------
t0=$(date +%s.%N)
PYTHONPATH=$OUT/lib "$VPY" scripts/check_cuda_registrations.py \
  || fail "hotloop._C (CUDA build) does not register what csrc/bindings declares"
t_import=$(since "$t0")
say "OK: venv ${t_venv} s, build ${t_build} s, import + registrations ${t_import} s, total $(since "$t_start") s"
