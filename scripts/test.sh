#!/usr/bin/env bash
# The whole test suite on a fresh machine: venv + build (scripts/setup_env.sh), nvcc compile check of the CUDA
# kernels (when nvcc exists), the C++ kernels' ctest, then pytest (Triton kernels through the interpreter when
# there is no GPU). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

bash scripts/nvcc_check.sh
cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release -DHOTLOOP_CUDA=OFF > build-cmake.log 2>&1 \
  || { cat build-cmake.log; exit 1; }
cmake --build build-cmake -j "$MAX_JOBS" > /dev/null
ctest --test-dir build-cmake --output-on-failure
"$PY" -m pytest -q tests "$@"
