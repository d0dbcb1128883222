"""Build of hotloop: the package (python/hotloop + triton_kernels) and its compiled extension hotloop._C.

hotloop._C always holds the C++ CPU kernels (-O3 -fopenmp; per-ISA translation units, see csrc/cpu/isa.h).
Where torch has CUDA and nvcc exists it also holds the CUDA kernels (csrc/cuda/*.cu and csrc/bindings/*_cuda.cpp).
Environment: HOTLOOP_NO_CUDA=1 skips CUDA; TORCH_CUDA_ARCH_LIST (default "8.0;9.0a") picks GPU archs;
MAX_JOBS bounds the parallel (ninja) compile.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    # no -std flag: the extension builder adds the standard that torch's own headers need.
    # -fno-trapping-math: under GCC's default the selects in the kernels' loops (clamps, exp's range handling)
    # become branches that are never vectorised; nothing reads floating-point exception flags, results are equal.
    cxx = ["-O3", "-fno-trapping-math", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    sources = _rel("csrc/cpu/*.cpp") + [p for p in _rel("csrc/bindings/*.cpp") if not p.endswith("_cuda.cpp")]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("HOTLOOP_NO_CUDA", "0") == "0")
    if not with_cuda:
        return CppExtension("hotloop._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    sources += _rel("csrc/cuda/*.cu") + _rel("csrc/bindings/*_cuda.cpp")
    return CUDAExtension(
        "hotloop._C", sources,
        define_macros=[("HOTLOOP_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


PEERS = ["trl>=1.16", "liger-kernel>=0.8.5", "transformers", "faiss-cpu", "cut-cross-entropy"]

setup(
    name="hotloop",
    version="0.1.0",
    description="Fused Triton / CUDA / C++ kernels for the hot loops of LLM post-training and self-supervised learning",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"hotloop": "python/hotloop", "hotloop.triton_kernels": "triton_kernels"},
    packages=["hotloop", "hotloop.cpu", "hotloop.ops", "hotloop.reference", "hotloop.triton_kernels",
              "hotloop.train", "hotloop.integrations"],
    ext_modules=[_extension()],
    cmdclass=_cmdclass(),
    install_requires=["torch>=2.4", "triton>=3.7.1; platform_system == 'Linux'"],
    extras_require={"test": ["pytest", "numpy"], "peers": PEERS, "gpu-peers": PEERS + ["flash-attn"]},
    zip_safe=False,
)
