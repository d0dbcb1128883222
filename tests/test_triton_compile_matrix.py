"""The Triton compile matrix (scripts/triton_compile_matrix.py): what it reaches and what it rejects.

CI runs the whole matrix (scripts/test.sh, both archs, the installed triton and the GPU image's 3.6.0); these
tests keep the tool itself honest: every launchable kernel and boolean constexpr is reached, a real compile for
sm_80 and sm_90a reads back registers and shared memory, and each failure rule fires. Child processes: the
matrix needs triton's JIT (the interpreter, which conftest turns on for this process, has no compiler).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "triton_compile_matrix.py"

sys.path.insert(0, str(SCRIPT.parent))
import triton_compile_matrix as matrix  # noqa: E402


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_every_launchable_kernel_and_flag_is_reached():
    proc = _run("--list", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "coverage: every launchable kernel" in proc.stdout
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("_")}
    assert {"_token_stats_fwd_kernel", "_linear_token_stats_bwd_kernel", "_ga_fixed_kernel",
            "_preference_pairs_kernel", "_dino_student_kernel", "_byol_loss_fwd_kernel"} <= listed


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compiles_for_the_gpu_and_reads_resources(arch):
    proc = _run("--worker", arch, "--only", "^(kto_items|token_stats torch.bfloat16 entropy=True sc=False rows=8 )")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["errors"] == []
    kernels = {r["kernel"] for r in result["rows"]}
    assert {"_kto_items_kernel", "_token_stats_fwd_kernel", "_token_stats_merge_kernel",
            "_token_stats_bwd_kernel"} <= kernels
    for r in result["rows"]:
        assert r["arch"] == arch and 0 < r["regs"] <= 255, r
        assert 0 <= r["smem"] <= matrix.ARCHS[arch].smem_limit, r
    assert matrix.violations(result) == []


def _row(**kw):
    row = dict(kernel="_k", variant="v", arch="sm_90a", regs=32, stack=0, local=0, smem=1024, spill_stores=0,
               spill_loads=0)
    return row | kw


def test_violations_name_each_failure():
    ok = {"rows": [_row()], "errors": []}
    assert matrix.violations(ok) == []
    smem = {"rows": [_row(arch="sm_80", smem=matrix.ARCHS["sm_80"].smem_limit + 1)], "errors": []}
    assert "shared memory" in matrix.violations(smem)[0]
    spill = {"rows": [_row(spill_stores=8, spill_loads=8)], "errors": []}
    assert "spills" in matrix.violations(spill)[0]
    allowed = matrix.SPILLS_ALLOWED[0]
    within = _row(kernel=allowed.kernel, variant=",".join(("X", *allowed.variant_has, "Y")),
                  spill_stores=allowed.max_bytes)
    assert matrix.violations({"rows": [within], "errors": []}) == []
    beyond = within | {"spill_loads": allowed.max_bytes + 4}
    assert "spills" in matrix.violations({"rows": [beyond], "errors": []})[0]
    other_variant = within | {"variant": "PRECISION=tf32"}
    assert "spills" in matrix.violations({"rows": [other_variant], "errors": []})[0]
    hopper = next(a for a in matrix.SPILLS_ALLOWED if a.arch == "sm_90a")
    on_hopper = _row(kernel=hopper.kernel, variant=",".join(hopper.variant_has), spill_loads=hopper.max_bytes)
    assert matrix.violations({"rows": [on_hopper], "errors": []}) == []
    assert "spills" in matrix.violations({"rows": [on_hopper | {"arch": "sm_80"}], "errors": []})[0]
    err = {"rows": [], "errors": [{"arch": "sm_80", "case": "c", "error": "CompilationError: boom\nmore"}]}
    assert matrix.violations(err) == ["[sm_80] c: CompilationError: boom"]
