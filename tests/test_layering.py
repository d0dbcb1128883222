"""The package's import graph has no upward arrows: ops <- nn <- train <- integrations.

Every import in every module of python/hotloop and triton_kernels/ (hotloop.triton_kernels), at module level or
inside a function, is read with ast (nothing is imported) as an arrow from the importing module to the imported
one. The layers, lowest first:
    0  the ops and what they stand on: ops/, reference/, cpu/, _internal/, contracts, peer_names, triton_kernels
       and the ops-level modules (ema_teacher, direct_pred, memory, memory_rewards)
    1  nn            loss modules with Liger's arguments, over the ops
    2  train         the training API on Hugging Face causal LMs (train.causal_lm) and SSL networks
    3  integrations  adapters for TRL and transformers on top of train
An arrow into a higher layer fails. hotloop/__init__.py is the facade above them all (it re-exports the ops and
nn, and loads train / integrations on first use), so its own imports are not checked.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"hotloop": ROOT / "python" / "hotloop", "hotloop.triton_kernels": ROOT / "triton_kernels"}
LAYERS = {"nn": 1, "train": 2, "integrations": 3}  # hotloop.<first part> -> layer; everything else is 0


def layer(module: str) -> int | None:
    """The layer of a hotloop module (None: not hotloop's)."""
    parts = module.split(".")
    if parts[0] != "hotloop":
        return None
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def modules() -> dict[str, Path]:
    found = {}
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(module: str, path: Path) -> set[str]:
    """The modules `module` imports; `from pkg import name` counts as pkg and as pkg.name, since name may be a
    submodule (`from hotloop import nn`); a plain name there stays in pkg's layer, decided by its first part."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return targets


def test_no_upward_imports():
    found = modules()
    assert {"hotloop.ops.policy_loss", "hotloop.contracts", "hotloop.peer_names", "hotloop.nn",
            "hotloop.train.causal_lm", "hotloop.integrations.trl", "hotloop.triton_kernels.policy_loss"} <= set(found)
    arrows = {(m, t) for m, p in found.items() if m != "hotloop" for t in imports(m, p) if layer(t) is not None}
    assert ("hotloop.integrations.trl", "hotloop.train.grpo") in arrows  # the scan sees the arrows that exist
    upward = sorted(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})" for m, t in arrows
                    if layer(t) > layer(m))
    assert not upward, "\n".join(upward)
