"""_core.matmul and _core.sum_squares (rnncore's GEMM and a float64 sum of squares, which the
Dense block, gradient clipping and RTRL use instead of NumPy's BLAS), and the Dense block on
them against PyTorch's Linear."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import rnncore as rc
from rnncore import _core
from conftest import assert_close

SHAPES = [(1, 1, 1), (7, 5, 3), (64, 92, 256), (33, 130, 17), (0, 4, 3), (4, 0, 3), (4, 3, 0)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_matmul_against_numpy(dtype, ta, tb):
    rng = np.random.default_rng(1)
    for M, N, K in SHAPES:
        a = rng.standard_normal((K, M) if ta else (M, K)).astype(dtype)
        b = rng.standard_normal((N, K) if tb else (K, N)).astype(dtype)
        want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
        got = _core.matmul(a, b, ta, tb)
        assert got.dtype == dtype and got.shape == (M, N)
        assert_close(got, want, dtype, f"{M}x{N}x{K}")
        c0 = rng.standard_normal((M, N)).astype(dtype)
        c = c0.copy()
        assert _core.matmul(a, b, ta, tb, out=c, beta=1.0) is not None
        assert_close(c, c0 + want, dtype, f"{M}x{N}x{K} accumulated")
        c = c0.copy()
        _core.matmul(a, b, ta, tb, out=c, beta=0.5)
        assert_close(c, 0.5 * c0 + want, dtype, f"{M}x{N}x{K} beta 0.5")


def test_matmul_strided_operands():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((40, 30)).astype(np.float32)[::2, 1::3]    # (20, 10), strided
    b = rng.standard_normal((10, 24)).astype(np.float32).T              # (24, 10), a transposed view
    np.testing.assert_allclose(_core.matmul(a, b, False, True), a @ b.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_core.matmul(a, b.T), a @ b.T, rtol=1e-5, atol=1e-5)


def test_matmul_rejects_bad_arguments():
    a = np.ones((3, 4), np.float32)
    b = np.ones((4, 5), np.float32)
    cases = [
        ((a, b.astype(np.float64)), {}, TypeError, "b: expected float32"),
        ((a.astype(np.int32), b), {}, TypeError, "a: expected float32 or float64"),
        ((a[0], b), {}, ValueError, "a: expected a 2-D array"),
        ((a, b[None]), {}, ValueError, "b: expected a 2-D array"),
        ((a, b.T), {}, ValueError, "b: expected 4 rows"),
        ((a, b, False, True), {}, ValueError, "b: expected 4 columns"),
        ((a, b), {"out": np.zeros((3, 4), np.float32)}, ValueError, r"out: expected shape \(3, 5\)"),
        ((a, b), {"out": np.zeros((3, 5), np.float64)}, TypeError, "out: expected a C-contiguous float32"),
        ((a, b), {"out": np.zeros((5, 3), np.float32).T}, TypeError, "out: expected a C-contiguous"),
        ((a, b), {"beta": 1.0}, ValueError, "beta: expected 0 without out"),
    ]
    for args, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            _core.matmul(*args, **kw)
    ro = np.zeros((3, 5), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out: array is read-only"):
        _core.matmul(a, b, out=ro)
    sq = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="out: expected memory of its own"):
        _core.matmul(sq, sq, out=sq)
    big = np.ones((8, 4), np.float32)
    _core.matmul(big[:4], sq, out=big[4:])   # disjoint halves of one array pass
    np.testing.assert_array_equal(big[4:], 4.0)
    with pytest.raises(ValueError, match="out: expected memory of its own"):
        _core.matmul(sq, big[3:7], out=big[4:])


def test_sum_squares():
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((31, 7)).astype(np.float32), rng.standard_normal(5),
              rng.standard_normal((6, 8))[:, ::3], np.zeros(0, np.float32)]
    want = sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays)
    assert _core.sum_squares(arrays) == pytest.approx(want, rel=1e-12)
    assert _core.sum_squares([]) == 0.0
    with pytest.raises(TypeError, match=r"arrays\[1\]: expected float32 or float64"):
        _core.sum_squares([arrays[0], np.ones(3, np.int64)])
    with pytest.raises(TypeError, match=r"arrays\[0\]: expected a numpy array"):
        _core.sum_squares([[1.0, 2.0]])
    # clip_grad_norm takes other dtypes as before (converted for the sum)
    g = {"a": np.full(4, 3, np.float16), "b": np.full(4, 4.0, np.float32)}
    assert rc.optim.clip_grad_norm(g, None) == pytest.approx(10.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_against_torch_linear(dtype, activation, bias):
    """Forward, input gradient and weight gradients against torch.nn.Linear (+ activation) for
    1-D, 2-D and strided 3-D inputs."""
    rng = np.random.default_rng(4)
    d = rc.Dense(12, 7, bias=bias, activation=activation, seed=0, dtype=dtype)
    lin = torch.nn.Linear(12, 7, bias=bias, dtype=torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(d.params["weight"]))
        if bias:
            lin.bias.copy_(torch.from_numpy(d.params["bias"]))
    act = {None: lambda v: v, "tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}[activation]
    for x in (rng.standard_normal(12), rng.standard_normal((5, 12)),
              rng.standard_normal((9, 4, 12)).transpose(1, 0, 2)):
        x = x.astype(dtype)
        d.zero_grad()
        lin.zero_grad()
        y = d.forward(x)
        xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
        yt = act(lin(xt))
        assert_close(y, yt.detach().numpy(), dtype, "y")
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx = d.backward(dy)
        (yt * torch.from_numpy(dy)).sum().backward()
        assert_close(dx, xt.grad.numpy(), dtype, "dx")
        assert_close(d.grads["weight"], lin.weight.grad.numpy(), dtype, "dW")
        if bias:
            assert_close(d.grads["bias"], lin.bias.grad.numpy(), dtype, "db")


def test_fit_runs_no_numpy_blas():
    """A training epoch of a Sequential with Dense blocks, gradient clipping and Adam calls no
    NumPy matrix product (they ran on NumPy's BLAS, whose idle threads then spun on rnncore's
    cores: an epoch of `rnncore train` took twice as long). Checked in a subprocess with NumPy's
    matmul and dot replaced by functions that fail."""
    code = r"""
import numpy as np, rnncore as rc
m = rc.Sequential(rc.Embedding(20, 8, seed=0), rc.LSTM(8, 16, batch_first=True, seed=0),
                  rc.Dense(16, 16, activation="tanh", seed=1), rc.Dense(16, 20, seed=2))
X = np.random.default_rng(0).integers(0, 20, (12, 10)); Y = np.roll(X, -1, axis=1)
m.fit(X, Y, epochs=1, batch_size=4, clip_norm=1.0, progress=False)   # warm: imports done
def banned(*a, **k):
    raise AssertionError("a NumPy BLAS call")
np.dot = banned; np.matmul = banned; np.vdot = banned; np.inner = banned; np.tensordot = banned
class Guard(np.ndarray):
    def __matmul__(self, other):
        raise AssertionError("a NumPy matrix product (@)")
    __rmatmul__ = __matmul__
import rnncore.blocks as blocks
orig = blocks.as_float_array
blocks.as_float_array = lambda *a, **k: orig(*a, **k).view(Guard)
h = m.fit(X, Y, epochs=2, batch_size=4, clip_norm=1.0, progress=False, validation_data=(X, Y))
assert np.isfinite(h.history["loss"]).all()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,kw", [(rc.optim.Adam, {}), (rc.optim.Adam, {"weight_decay": 0.1}),
                                    (rc.optim.AdamW, {"weight_decay": 0.3})])
def test_fused_adam_matches_the_numpy_rule(cls, kw, dtype, each_isa):
    """The one-pass kernel of every ISA (C-contiguous arrays) against the NumPy rule (taken for
    a Fortran-ordered parameter) over several steps; 6 x 37 elements leave a vector remnant."""
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal((6, 37)).astype(dtype)
    a = {"w": p0.copy()}
    b = {"w": np.asfortranarray(p0)}
    oa, ob = cls(lr=0.05, **kw), cls(lr=0.05, **kw)
    for _ in range(6):
        g = rng.standard_normal(p0.shape).astype(dtype)
        oa.step(a, {"w": g})
        ob.step(b, {"w": np.asfortranarray(g)})
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(a["w"], b["w"], rtol=tol, atol=tol)
    assert not np.allclose(a["w"], p0)
    np.testing.assert_allclose(oa.state["w"]["v"], ob.state["w"]["v"], rtol=tol, atol=tol)


def test_adam_with_grads_that_are_the_params():
    """Gradients sharing the parameters' memory take the NumPy rule (the fused kernel would
    read them as distinct arrays)."""
    a = {"w": np.ones(5, np.float32)}
    b = {"w": np.asfortranarray(np.ones((5, 1), np.float32))}
    rc.optim.Adam(lr=0.1).step(a, a)
    rc.optim.Adam(lr=0.1).step(b, {"w": b["w"].copy()})
    np.testing.assert_allclose(a["w"], b["w"][:, 0], rtol=1e-6)


def test_fused_adam_rejects_bad_arrays():
    p = np.ones(4, np.float32)
    z = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="grad: expected a C-contiguous float32"):
        _core.adam_update(p, np.ones(4), z.copy(), z.copy(), 0.1, 0.9, 0.999, 1e-8, 0.0, False, 1)
    with pytest.raises(ValueError, match=r"exp_avg: expected shape \(4,\)"):
        _core.adam_update(p, p.copy(), np.zeros(5, np.float32), z.copy(), 0.1, 0.9, 0.999, 1e-8, 0.0, False, 1)
    with pytest.raises(ValueError, match="step: expected >= 1"):
        _core.adam_update(p, p.copy(), z.copy(), z.copy(), 0.1, 0.9, 0.999, 1e-8, 0.0, False, 0)
    ro = z.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _core.adam_update(p, p.copy(), ro, z.copy(), 0.1, 0.9, 0.999, 1e-8, 0.0, False, 1)
    m = z.copy()
    with pytest.raises(ValueError, match="must not share memory"):
        _core.adam_update(p, p.copy(), m, m, 0.1, 0.9, 0.999, 1e-8, 0.0, False, 1)
    with pytest.raises(ValueError, match="must not share memory"):
        _core.adam_update(p, p, z.copy(), z.copy(), 0.1, 0.9, 0.999, 1e-8, 0.0, False, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_backward_matches_add_at(dtype):
    rng = np.random.default_rng(6)
    e = rc.Embedding(7, 5, seed=0, dtype=dtype)
    ids = rng.integers(0, 7, (4, 9))
    ids[0, :3] = 2   # repeated ids accumulate
    y = e.forward(ids)
    dy = rng.standard_normal(y.shape).astype(dtype)
    e.grads["weight"][:] = 1.0
    assert e.backward(dy) is None
    want = np.ones((7, 5), dtype)
    np.add.at(want, ids.reshape(-1), dy.reshape(-1, 5))
    np.testing.assert_allclose(e.grads["weight"], want, rtol=1e-6)
    e.forward(ids)
    with pytest.raises(ValueError, match=r"dy: expected shape \(4, 9, 5\)"):
        e.backward(dy.reshape(9, 4, 5))


def test_scatter_add_rows_rejects_bad_arguments():
    out = np.zeros((3, 2), np.float32)
    rows = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 3\), got 3 at index 1"):
        _core.scatter_add_rows(out, np.array([0, 3]), rows)
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 3\), got -1"):
        _core.scatter_add_rows(out, np.array([-1, 0]), rows)
    assert not out.any()   # checked before any row is added
    with pytest.raises(TypeError, match="ids: expected an integer array"):
        _core.scatter_add_rows(out, np.array([0.0, 1.0]), rows)
    with pytest.raises(ValueError, match=r"rows: expected shape \(3, 2\)"):
        _core.scatter_add_rows(out, np.array([0, 1, 2]), rows)
    with pytest.raises(TypeError, match="rows: expected a C-contiguous float32"):
        _core.scatter_add_rows(out, np.array([0, 1]), rows.astype(np.float64))
    _core.scatter_add_rows(out, np.array([2, 2], np.int32), rows)
    np.testing.assert_array_equal(out, [[0, 0], [0, 0], [2, 2]])


def xent_reference(z, t, w):
    z = z.astype(np.float64)
    zm = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(zm).sum(axis=1))
    loss = float((w * (lse - zm[np.arange(len(t)), t])).sum())
    g = np.exp(zm - lse[:, None])
    g[np.arange(len(t)), t] -= 1
    return loss, g * w[:, None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [1, 5, 16, 17, 94, 300])
def test_softmax_xent_kernel_against_float64(dtype, C, each_isa):
    """Every ISA's kernel: rows with weight 0, large and very negative logits (the max taken
    off), a class count on and off the vector width."""
    rng = np.random.default_rng(C)
    R = 37
    z = (rng.standard_normal((R, C)) * 4).astype(dtype)
    z[3] += 80.0
    z[4] -= 1e4
    t = rng.integers(0, C, R)
    w = rng.uniform(0.1, 1.0, R).astype(dtype)
    w[5] = 0
    loss, g = _core.softmax_xent(z, t, w)
    want_loss, want_g = xent_reference(z, t, w.astype(np.float64))
    tol = 2e-6 if dtype == np.float32 else 1e-12
    assert loss == pytest.approx(want_loss, rel=tol, abs=tol)
    assert g.dtype == dtype and g.shape == (R, C)
    np.testing.assert_allclose(g, want_g, rtol=tol * 5, atol=tol)
    assert not g[5].any()


def test_softmax_xent_rejects_bad_arguments():
    z = np.zeros((3, 4), np.float32)
    w = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"targets: expected class ids in \[0, 3\], got 4 at index 2"):
        _core.softmax_xent(z, np.array([0, 1, 4]), w)
    with pytest.raises(ValueError, match=r"got -1 at index 0"):
        _core.softmax_xent(z, np.array([-1, 1, 2]), w)
    with pytest.raises(TypeError, match="targets: expected integer class ids"):
        _core.softmax_xent(z, np.array([0.0, 1.0, 2.0]), w)
    with pytest.raises(ValueError, match=r"targets: expected shape \(3,\)"):
        _core.softmax_xent(z, np.array([0, 1]), w)
    with pytest.raises(TypeError, match="weights: expected a C-contiguous float32"):
        _core.softmax_xent(z, np.array([0, 1, 2]), w.astype(np.float64))
    with pytest.raises(TypeError, match="logits: expected float32 or float64"):
        _core.softmax_xent(z.astype(np.int32), np.array([0, 1, 2]), w)
    with pytest.raises(ValueError, match="logits: expected a 2-D array"):
        _core.softmax_xent(z[0], np.array([0]), w[:1])
    with pytest.raises(ValueError, match="logits: expected at least one class"):
        _core.softmax_xent(np.zeros((3, 0), np.float32), np.array([0, 0, 0]), w)
    loss, g = _core.softmax_xent(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
    assert loss == 0.0 and g.shape == (0, 4)
