# Sourced by scripts/test.sh and scripts/bench.sh. Makes (once) the venv, installs what hotloop needs without
# ever moving torch, and builds the extension (incrementally after the first time). Leaves PY and CONSTRAINTS set.
#   torch: the one already installed (the venv sees the system's packages when python3 has torch), else
#          torch==2.13.0 from requirements/constraints.txt; either way pinned for every later install.
# Variables: HOTLOOP_VENV (default .venv), PYTHON (default python3), MAX_JOBS (default 2).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${HOTLOOP_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-2}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
CONSTRAINTS="$VENV/hotloop-constraints.txt"
if "$PY" -c "import torch" 2>/dev/null; then
  echo "torch==$("$PY" -c 'import torch; print(torch.__version__)')" > "$CONSTRAINTS"
else
  cp requirements/constraints.txt "$CONSTRAINTS"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -c "$CONSTRAINTS" torch
fi
"$PY" -m pip install -q -c "$CONSTRAINTS" "triton>=3.7.1" ninja pybind11 "setuptools>=64" wheel pytest numpy transformers "trl>=1.16" matplotlib

if "$PY" -c "import hotloop" 2>/dev/null; then
  "$PY" setup.py -q build_ext --inplace  # ninja rebuilds only what changed
else
  "$PY" -m pip install -q --no-build-isolation --no-deps -c "$CONSTRAINTS" -e .
fi
"$PY" -c "import hotloop._C" || { echo "hotloop._C failed to build or import" >&2; exit 1; }
