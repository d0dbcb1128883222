#!/usr/bin/env bash
# The GPU block of a session that is lent a GPU, in one device call (see DEVELOPERS / device METHOD notes):
#   1. installs the carried peer wheels (.whl/, gitignored: liger-kernel, cut-cross-entropy, trl) into /tmp/site
#   2. measures the two ceilings: device-to-device copy bandwidth and the dense bf16 matmul rate
#   3. builds hotloop with its CUDA kernels (sm_90a) against the machine's torch
#   4. runs the GPU tests (cuda + triton backends, real GPU, no interpreter)
#   5. runs the benchmark suite against the peers
# Everything lands under $OUT (logs, results/<device>/*.json|md) for the session to commit.
# Usage on the device: bash benchmarks/gpu_check.sh [--quick]   (carry: .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hotloop_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

"$PY" - > "$OUT/ceilings.txt" 2>&1 <<'PYEOF'
import torch, triton.testing as tt
x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16); y = torch.empty_like(x)
ms = tt.do_bench(lambda: y.copy_(x), return_mode="median")
print(f"copy_bandwidth_GBps {2 * x.numel() * 2 / ms / 1e6:.0f}")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
ms = tt.do_bench(lambda: a @ b, return_mode="median")
print(f"bf16_matmul_TFLOPs {2 * 8192**3 / ms / 1e9:.0f}")
print(torch.__version__, torch.cuda.get_device_name())
PYEOF
cat "$OUT/ceilings.txt"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
"$PY" -c "import hotloop._ext as e; print('cuda kernels built:', e.has_cuda_kernels())" | tee -a "$OUT/build.log"

"$PY" -m pytest -q tests -k "cuda or triton" -p no:cacheprovider > "$OUT/tests.log" 2>&1
tail -15 "$OUT/tests.log"

"$PY" -m benchmarks.run --out-dir "$OUT/results" "$@" > "$OUT/bench.log" 2>&1
tail -60 "$OUT/bench.log"
