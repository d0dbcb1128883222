"""Check that an imported CUDA build of hotloop._C registers every CUDA kernel, and nothing without a schema.

Run with the python of a CUDA torch and hotloop (with its _C) importable, e.g. by scripts/cuda_build_check.sh:
    PYTHONPATH=build/cuda-check/lib python scripts/check_cuda_registrations.py
No GPU needed: registrations happen when _C is imported. The expected names come from the sources, never a
hand-kept list:
  - schemas: every m.def in csrc/bindings/ops.cpp (literal names, and `for (const char* backend : {...})` loops
    over std::string("prefix_") + backend), checked against the dispatcher's hotloop:: ops;
  - CUDA implementations: every m.impl("...") inside TORCH_LIBRARY_IMPL(hotloop, CUDA, m) of csrc/bindings/*.cpp.
Passes when every *_cuda schema has an implementation in the sources and a CUDA kernel in the dispatcher, every
CUDA implementation has a schema, no *_cuda op has a CPU kernel (nor *_cpu op a CUDA kernel), every hotloop:: op
has a schema, and hotloop._internal.extension.has_cuda_kernels() is True. Exit 1 with one line per problem otherwise.
"""
from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINDINGS = os.path.join(ROOT, "csrc", "bindings")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def schema_names(ops_cpp: str) -> list[str]:
    """Op names of every m.def in ops.cpp's TORCH_LIBRARY, expanding `for (const char* v : {"a", "b"})` loops."""
    text = _strip_comments(ops_cpp)
    names = re.findall(r"\bm\.def\(\s*\"([A-Za-z_]\w*)\s*\(", text)
    n_loop_defs = 0
    for loop in re.finditer(r"for\s*\(\s*const\s+char\s*\*\s*(\w+)\s*:\s*\{([^}]*)\}\s*\)", text):
        var, values = loop.group(1), re.findall(r"\"(\w+)\"", loop.group(2))
        body = re.match(r"\s*\{\s*m\.def\(\s*\(?\s*std::string\(\s*\"(\w*)\"\s*\)\s*\+\s*" + var + r"\b",
                        text[loop.end():])
        if body is None:
            raise SystemExit(f"check_cuda_registrations: cannot read the m.def loop over {var} at offset "
                             f"{loop.start()} of csrc/bindings/ops.cpp; update schema_names() for its new form")
        names += [body.group(1) + v for v in values]
        n_loop_defs += 1
    n_defs = len(re.findall(r"\bm\.def\(", text))
    parsed = len(re.findall(r"\bm\.def\(\s*\"", text)) + n_loop_defs
    if parsed != n_defs:
        raise SystemExit(f"check_cuda_registrations: read {parsed} of the {n_defs} m.def calls in "
                         "csrc/bindings/ops.cpp; update schema_names() for the new form")
    return names


def cuda_impl_names(sources: dict[str, str]) -> dict[str, str]:
    """{op name: file} of every m.impl inside a TORCH_LIBRARY_IMPL(hotloop, CUDA, m) block."""
    impls: dict[str, str] = {}
    for path, src in sources.items():
        text = _strip_comments(src)
        for block in re.finditer(r"TORCH_LIBRARY_IMPL\(\s*hotloop\s*,\s*CUDA\s*,\s*(\w+)\s*\)\s*\{", text):
            depth, i = 1, block.end()
            while depth and i < len(text):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            for name in re.findall(r"\b" + block.group(1) + r"\.impl\(\s*\"(\w+)\"", text[block.end():i]):
                impls[name] = os.path.relpath(path, ROOT)
    return impls


def main() -> int:
    with open(os.path.join(BINDINGS, "ops.cpp")) as f:
        schemas = schema_names(f.read())
    sources = {}
    for name in sorted(os.listdir(BINDINGS)):
        if name.endswith(".cpp"):
            with open(os.path.join(BINDINGS, name)) as f:
                sources[os.path.join(BINDINGS, name)] = f.read()
    impls = cuda_impl_names(sources)

    import torch

    import hotloop._internal.extension as ext

    problems = []
    if ext._C is None:
        print(f"check_cuda_registrations: hotloop._C did not load: {ext._IMPORT_ERROR}", file=sys.stderr)
        return 1
    print(f"check_cuda_registrations: torch {torch.__version__} (CUDA {torch.version.cuda}), {ext._C.__file__}")
    if not ext.has_cuda_kernels():
        problems.append("hotloop._internal.extension.has_cuda_kernels() is False: _C was built without HOTLOOP_WITH_CUDA")

    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("hotloop::")}
    for name in sorted(set(schemas) - registered):
        problems.append(f"hotloop::{name} is defined in ops.cpp but not in the dispatcher (schema parse error?)")
    for name in sorted(registered):
        try:
            torch._C._dispatch_find_schema_or_throw(f"hotloop::{name}", "")
        except RuntimeError:
            problems.append(f"hotloop::{name} has a kernel registered but no schema (no m.def in ops.cpp)")
    if len(set(schemas)) != len(schemas):
        problems.append(f"ops.cpp defines a name twice: {sorted(n for n in set(schemas) if schemas.count(n) > 1)}")

    def has(name: str, key: str) -> bool:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"hotloop::{name}", key)

    expected = sorted(n for n in set(schemas) if n.endswith("_cuda"))
    for name in expected:
        if name not in impls:
            problems.append(f"hotloop::{name}: schema in ops.cpp, no m.impl in a TORCH_LIBRARY_IMPL(hotloop, CUDA) "
                            "block of csrc/bindings/*_cuda.cpp")
        if not has(name, "CUDA"):
            problems.append(f"hotloop::{name}: no CUDA kernel registered after importing _C")
        if has(name, "CPU"):
            problems.append(f"hotloop::{name}: a CUDA op with a CPU kernel registered")
    for name, path in sorted(impls.items()):
        if name not in schemas:
            problems.append(f"hotloop::{name}: m.impl for CUDA in {path} but no schema in ops.cpp")
        elif not name.endswith("_cuda"):
            problems.append(f"hotloop::{name}: CUDA implementation of an op not named *_cuda ({path})")
    for name in sorted(n for n in set(schemas) if n.endswith("_cpu")):
        if has(name, "CUDA"):
            problems.append(f"hotloop::{name}: a CPU op with a CUDA kernel registered")

    for name in expected:
        print(f"  hotloop::{name:24s} CUDA kernel: {'yes' if has(name, 'CUDA') else 'NO'}  ({impls.get(name, '-')})")
    if problems:
        print(f"check_cuda_registrations: FAILED, {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"check_cuda_registrations: OK: {len(expected)} CUDA kernels registered, {len(registered)} hotloop ops, "
          "all with schemas")
    return 0


if __name__ == "__main__":
    sys.exit(main())
