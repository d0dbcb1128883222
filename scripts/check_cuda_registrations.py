"""Check that an imported CUDA build of hotloop._C holds every CUDA kernel, and that every kernel the dispatcher
names in the extension exists there.

Run with the python of a CUDA torch and hotloop (with its _C) importable, e.g. by scripts/cuda_build_check.sh:
    PYTHONPATH=build/cuda-check/lib python scripts/check_cuda_registrations.py
No GPU needed: the kernels are bound when _C is imported. The expected names come from the sources, never a
hand-kept list: every m.def("name", ...) inside a `Kernels ...("cuda" | "cpu", ...)` table of csrc/bindings/*.cpp
(module.h). Passes when hotloop._C.cuda / hotloop._C.cpu hold exactly those functions, every kernel registered in
hotloop._internal.dispatch as dispatch.extension(backend, name) resolves to one of them, and
hotloop._internal.extension.has_cuda_kernels() is True. Exit 1 with one line per problem otherwise.
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


def bound_names(sources: dict[str, str]) -> dict[str, dict[str, str]]:
    """{submodule: {kernel name: file}} of every m.def inside a `Kernels <var>("<submodule>", ...)` table."""
    found: dict[str, dict[str, str]] = {"cpu": {}, "cuda": {}}
    for path, src in sources.items():
        text = _strip_comments(src)
        for table in re.finditer(r"\bKernels\s+\w+\(\s*\"(\w+)\"\s*,", text):
            depth, i = 1, table.end()  # the table's extent: up to its closing parenthesis
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            for name in re.findall(r"\bm\.def\(\s*\"(\w+)\"", text[table.end():i]):
                found.setdefault(table.group(1), {})[name] = os.path.relpath(path, ROOT)
    return found


def main() -> int:
    sources = {}
    for name in sorted(os.listdir(BINDINGS)):
        if name.endswith(".cpp"):
            with open(os.path.join(BINDINGS, name)) as f:
                sources[os.path.join(BINDINGS, name)] = f.read()
    expected = bound_names(sources)

    import torch

    import hotloop  # noqa: F401  (registers every op's kernels with the dispatcher)
    import hotloop._internal.extension as ext
    from hotloop._internal import dispatch

    if ext._C is None:
        print(f"check_cuda_registrations: hotloop._C did not load: {ext._IMPORT_ERROR}", file=sys.stderr)
        return 1
    print(f"check_cuda_registrations: torch {torch.__version__} (CUDA {torch.version.cuda}), {ext._C.__file__}")
    problems = []
    if not ext.has_cuda_kernels():
        problems.append("hotloop._internal.extension.has_cuda_kernels() is False: _C was built without "
                        "HOTLOOP_WITH_CUDA")
    for sub in ("cpu", "cuda"):
        module = getattr(ext._C, sub, None)
        have = set() if module is None else {n for n in dir(module) if not n.startswith("_")}
        for name in sorted(set(expected[sub]) - have):
            problems.append(f"hotloop._C.{sub}.{name}: bound in {expected[sub][name]}, missing after import")
        for name in sorted(have - set(expected[sub])):
            problems.append(f"hotloop._C.{sub}.{name}: present, but no m.def in a Kernels(\"{sub}\") table")
        for name in sorted(expected[sub]):
            print(f"  hotloop._C.{sub}.{name:22s} {'yes' if name in have else 'NO'}  ({expected[sub][name]})")
    for op, table in sorted(dispatch._KERNELS.items()):
        for backend, fn in table.items():
            if isinstance(fn, str) and fn.startswith("hotloop._C:"):
                sub, name = fn.split(":", 1)[1].split(".", 1)
                if name not in expected.get(sub, {}):
                    problems.append(f"dispatch: {op!r} / {backend!r} names {fn}, which no binding defines")
    if problems:
        print(f"check_cuda_registrations: FAILED, {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"check_cuda_registrations: OK: {len(expected['cuda'])} CUDA and {len(expected['cpu'])} CPU kernels bound, "
          "every dispatcher entry resolves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
