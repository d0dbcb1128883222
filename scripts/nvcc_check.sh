#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu for sm_80 and sm_90a (object files go to a temp dir and are discarded).
#   - one line per file/arch; compiler warnings are shown; exit 1 if any compile fails
#   - no nvcc (neither on PATH, nor $NVCC, nor $CUDA_HOME/bin/nvcc): prints a message and exits 0
#   - HOTLOOP_NVCC_VERBOSE=1: also write ptxas register/spill reports to a log (HOTLOOP_NVCC_LOG, default
#     build/nvcc_check.log) and print its path
#   - HOTLOOP_NVCC_WERROR=1: treat warnings as errors
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

nvcc_bin="${NVCC:-}"
if [[ -z "$nvcc_bin" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc_bin="$(command -v nvcc)"
  elif [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
    nvcc_bin="${CUDA_HOME}/bin/nvcc"
  fi
fi
if [[ -z "$nvcc_bin" ]] || ! command -v "$nvcc_bin" >/dev/null 2>&1; then
  echo "nvcc_check: nvcc not found, skipping CUDA compile check"
  exit 0
fi

shopt -s nullglob
sources=("$root"/csrc/cuda/*.cu)
if (( ${#sources[@]} == 0 )); then
  echo "nvcc_check: no csrc/cuda/*.cu files, nothing to do"
  exit 0
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/hotloop_nvcc.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

verbose="${HOTLOOP_NVCC_VERBOSE:-0}"
log=""
if [[ "$verbose" == "1" ]]; then
  log="${HOTLOOP_NVCC_LOG:-$root/build/nvcc_check.log}"
  mkdir -p "$(dirname "$log")"
  : > "$log"
fi

common=(-c -std=c++17 -O3 -I"$root/csrc/cuda" -Xcompiler=-Wall,-Wextra
        -Xptxas=-warn-spills,-warn-lmem-usage --expt-relaxed-constexpr)
if [[ "${HOTLOOP_NVCC_WERROR:-0}" == "1" ]]; then
  common+=(-Werror=all-warnings)
fi
[[ "$verbose" == "1" ]] && common+=(-Xptxas=-v)

archs=("sm_80" "sm_90a")
arch_flags() {
  case "$1" in
    sm_80) echo "-arch=sm_80" ;;
    sm_90a) echo "-gencode=arch=compute_90a,code=sm_90a" ;;
  esac
}

echo "nvcc_check: $("$nvcc_bin" --version | tail -n 1)"
failed=0
for src in "${sources[@]}"; do
  rel="${src#"$root"/}"
  name="$(basename "$src" .cu)"
  for arch in "${archs[@]}"; do
    out="$tmp/$name.$arch.o"
    msgs="$tmp/$name.$arch.txt"
    start=$SECONDS
    # shellcheck disable=SC2046
    "$nvcc_bin" "${common[@]}" $(arch_flags "$arch") "$src" -o "$out" >"$msgs" 2>&1
    rc=$?
    secs=$((SECONDS - start))
    # ptxas -v chatter is resource usage, not a warning: it goes to the log only
    if [[ "$verbose" == "1" ]]; then
      { echo "=== $rel [$arch]"; grep -E "ptxas info|bytes stack frame|spill" "$msgs"; } >> "$log"
    fi
    other="$(grep -vE "ptxas info|bytes stack frame, [0-9]+ bytes spill stores" "$msgs" || true)"
    nwarn="$(grep -ciE "warning" <<<"$other" || true)"
    if (( rc != 0 )); then
      echo "FAIL $rel [$arch] (${secs}s)"
      failed=1
    elif [[ -n "$other" ]]; then
      echo "OK   $rel [$arch] (${secs}s, ${nwarn} warning(s))"
    else
      echo "OK   $rel [$arch] (${secs}s)"
    fi
    [[ -n "$other" ]] && sed 's/^/    /' <<<"$other"
  done
done

if [[ "$verbose" == "1" ]]; then
  echo "nvcc_check: ptxas resource usage written to $log"
  if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" >/dev/null; then
    echo "nvcc_check: WARNING: register spills reported (see $log)"
  fi
fi
exit "$failed"
