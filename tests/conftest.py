import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

import rnncore

TOL = {np.float32: 2e-5, np.float64: 1e-9}


@pytest.fixture(autouse=True)
def seeded_by_test_id(request):
    """Every test's seed=None draws (the layers' weights above all) repeat from run to run:
    rnncore.manual_seed of the test's id. A failure in CI then reproduces here with the same
    weights (session 37's CI failed on an unseeded layer whose one saturated unit hid a weight's
    edit: 2-3 in 200,000 draws, found by drawing seeds in the test's order of calls)."""
    rnncore.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
    rnncore.manual_seed(None)


def assert_close(got, want, dtype, what=""):
    """Max abs error relative to the reference's scale (at least 1)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = float(np.abs(got - want).max(initial=0.0)) / scale
    tol = TOL[np.dtype(dtype).type]
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def numeric_grad(arr, loss, eps=1e-6):
    """Central differences of the scalar loss() with respect to every element of arr (changed
    in place and restored)."""
    g = np.zeros_like(arr)
    for i in np.ndindex(arr.shape):
        old = arr[i]
        arr[i] = old + eps
        up = loss()
        arr[i] = old - eps
        down = loss()
        arr[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


def run_child(code: str, timeout=120, env=None):
    """Runs code in a fresh interpreter (with `env` added to the environment); returns
    CompletedProcess. A crash (segfault, abort) shows as a negative return code."""
    env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def amx_usable():
    return not rnncore._core.amx_status().startswith("not available")


def _isa_params():
    isas = rnncore._core.available_isas().split(",")
    if "avx512" in isas and amx_usable():
        isas.insert(0, "avx512+amx")   # the avx512 kernels with the AMX GEMM; "avx512" without it
    return isas


@pytest.fixture(params=_isa_params())
def each_isa(request):
    """Runs a test once per kernel ISA this CPU supports (and, where the CPU has AMX, the avx512
    kernels once with the AMX GEMM and once without)."""
    old, old_amx = rnncore._core.isa(), rnncore._core.amx_enabled()
    rnncore._core.set_isa(request.param.split("+")[0])
    rnncore._core.set_amx(request.param.endswith("+amx"))
    yield request.param
    rnncore._core.set_isa(old)
    rnncore._core.set_amx(old_amx)


@pytest.fixture
def threads():
    old = rnncore.get_num_threads()
    yield rnncore.set_num_threads
    rnncore.set_num_threads(old)
