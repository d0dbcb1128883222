"""Packaging: setup.py pins the torch release _C is built against and leaves triton to an extra; hotloop/_ext.py
refuses (with a message naming both torches and the rebuild command) a _C built for another torch, and the
package still works with the reference backend then. Nothing is rebuilt: setup.py runs with setuptools.setup
stubbed, and a mismatching build is faked with a stand-in hotloop._build_info module in a fresh interpreter."""
import os
import runpy
import subprocess
import sys
import textwrap

import pytest
import setuptools
import torch

import hotloop._internal.extension as ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = torch.__version__.split("+", 1)[0]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's setup() keywords and its namespace, without building anything."""
    captured = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
        mp.chdir(ROOT)
        namespace = runpy.run_path(os.path.join(ROOT, "setup.py"))
    return captured, namespace


def test_install_requires_pins_torch_without_triton(setup_py):
    kwargs, _ = setup_py
    requires = kwargs["install_requires"]
    assert f"torch=={RELEASE}" in requires, requires  # the release, not the local tag: +cpu / +cu130 both match
    assert not [r for r in requires if r.lower().startswith("torch") and r != f"torch=={RELEASE}"], requires
    assert not [r for r in requires if r.lower().startswith("triton")], requires
    assert any(r.startswith("triton") for r in kwargs["extras_require"]["triton"])


def test_build_info_records_the_build_torch(setup_py, tmp_path):
    _, namespace = setup_py
    path = tmp_path / "_build_info.py"
    namespace["write_build_info"](str(path), "2.13.0+cu130", "13.0", True)
    info = runpy.run_path(str(path))
    assert (info["TORCH_VERSION"], info["TORCH_CUDA"], info["WITH_CUDA"]) == ("2.13.0+cu130", "13.0", True)


def test_mismatch_message():
    err = ext.torch_mismatch("2.12.0+cpu", "2.13.0+cu130")
    assert isinstance(err, ImportError)
    msg = str(err)
    for part in ("built for torch 2.12.0+cpu", "torch 2.13.0+cu130 is running",
                 "pip install --no-build-isolation -e ."):
        assert part in msg, msg
    assert ext.torch_mismatch("2.13.0+cpu", "2.13.0+cu130") is None  # same release, other build: same ABI
    assert ext.torch_mismatch("2.13.0", "2.13.0+cpu") is None
    assert ext.torch_mismatch(None, "2.13.0+cpu") is None  # no record (a build from before it): not checked


def _run_with_build_info(torch_version, body):
    """Run `body` in a fresh interpreter whose hotloop._build_info says _C was built for torch_version."""
    code = textwrap.dedent(f"""
        import sys, types, warnings
        info = types.ModuleType("hotloop._build_info")
        info.TORCH_VERSION = {torch_version!r}
        sys.modules["hotloop._build_info"] = info
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import hotloop
        warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    """) + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if k != "HOTLOOP_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_import_refuses_c_built_for_another_torch():
    out = _run_with_build_info("2.0.0+cu118", """
        import os
        import torch
        assert hotloop._internal.extension._C is None and "hotloop._C" not in sys.modules, "a mismatching _C was loaded"
        assert len(warned) == 1, warned
        print("WARNED:", warned[0])
        try:
            hotloop._internal.extension.require_extension("cpu")
        except RuntimeError as e:
            print("ERROR:", e)
        else:
            raise AssertionError("require_extension passed without _C")
        os.environ["HOTLOOP_BACKEND"] = "reference"  # the package still works without _C
        lp = hotloop.token_logprobs(torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3)))
        print("REFERENCE:", tuple(lp.shape))
    """)
    running = torch.__version__
    warned = next(line for line in out.splitlines() if line.startswith("WARNED:"))
    error = next(line for line in out.splitlines() if line.startswith("ERROR:"))
    for line in (warned, error):
        assert "built for torch 2.0.0+cu118" in line, out
        assert f"torch {running} is running" in line, out
        assert "pip install --no-build-isolation -e ." in line, out
    assert "'cpu' backend" in error and "HOTLOOP_BACKEND=reference" in error, out
    assert "REFERENCE: (2, 3)" in out, out


def test_import_loads_c_built_for_this_torch_release():
    if ext._C is None:
        pytest.skip(f"hotloop._C is not built here ({ext._IMPORT_ERROR})")
    try:
        from hotloop import _build_info
    except ImportError:
        pytest.skip("hotloop._C was built before setup.py recorded hotloop/_build_info.py")
    assert _build_info.TORCH_VERSION.split("+", 1)[0] == RELEASE
    assert ext._IMPORT_ERROR is None
    out = _run_with_build_info(f"{RELEASE}+cu999", """
        assert hotloop._internal.extension._C is not None, hotloop._internal.extension._IMPORT_ERROR
        assert not warned, warned
        print("LOADED")
    """)
    assert "LOADED" in out


def test_build_py_ships_every_module(tmp_path):
    """What setup.py puts in a wheel (build_py) holds every module of python/hotloop and triton_kernels/."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=root,
                   check=True, capture_output=True, timeout=300)
    for src, dst in (("python/hotloop", "hotloop"), ("triton_kernels", "hotloop/triton_kernels")):
        base = os.path.join(root, src)
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in files:
                if f.endswith(".py") and f != "_build_info.py":
                    rel = os.path.relpath(os.path.join(dirpath, f), base)
                    assert os.path.exists(os.path.join(tmp_path, dst, rel)), f"{src}/{rel} is not packaged"
