#!/usr/bin/env bash
# The whole test suite on a fresh machine: venv + build (scripts/setup_env.sh), nvcc compile check of the CUDA
# kernels and a build of the whole extension against a CUDA torch (when nvcc exists), the C++ kernels' ctest,
# the Triton compile matrix for real GPUs, then pytest (Triton kernels through the interpreter when there is no
# GPU). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

bash scripts/nvcc_check.sh
bash scripts/cuda_build_check.sh  # _C against a CUDA torch (cached venv, ccache): builds, CUDA kernels register
cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release -DHOTLOOP_CUDA=OFF > build-cmake.log 2>&1 \
  || { cat build-cmake.log; exit 1; }
cmake --build build-cmake -j "$MAX_JOBS" > /dev/null
ctest --test-dir build-cmake --output-on-failure
# every Triton kernel variant the launchers choose, compiled for sm_80 and sm_90a (no GPU needed), with this
# triton and with the GPU image's 3.6.0; compiled kernels are cached under ~/.triton/cache
for triton_version in "" 3.6.0; do
  "$PY" scripts/triton_compile_matrix.py ${triton_version:+--triton "$triton_version"}
done
"$PY" -m pytest -q tests "$@"
