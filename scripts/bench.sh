#!/usr/bin/env bash
# The benchmark suite on a fresh machine: venv + build (scripts/setup_env.sh), the peers it compares against
# (best effort: a peer that does not install is reported as unavailable), then every benchmarks/bench_*.py on
# the GPU if there is one, else on the CPU. Prints the table; writes JSON + markdown under benchmarks/results/.
# Extra arguments go to benchmarks.run (e.g. --quick, --cases).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

for peer in ${HOTLOOP_PEERS:-trl liger-kernel cut-cross-entropy faiss-cpu}; do
  "$PY" -m pip install -q -c "$CONSTRAINTS" "$peer" || echo "peer $peer did not install; benchmarks skip it"
done
"$PY" -m benchmarks.run "$@"
