"""rnncore's own GEMM (the input projection and the weight and input gradients of BPTT)
against float64 NumPy: every ISA, both operand orders, shapes with remnants of every block
(rows of the micro-kernel, columns of a B panel, the K block, the N block)."""
import itertools

import numpy as np
import pytest

from conftest import amx_usable, run_child
from rnncore import _core

SHAPES = [(1, 1, 1), (13, 37, 5), (33, 17, 3), (50, 33, 400), (97, 70, 769),
          (200, 1400, 390), (25, 4096, 64), (1600, 128, 1024),
          # several A blocks per thread from an equal share of the row tiles, a remnant tile
          (1030, 70, 500), (3100, 33, 50)]


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_gemm_against_numpy(ta, tb, each_isa):
    rng = np.random.default_rng(7)
    for M, N, K in SHAPES:
        a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
        want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
        got = _core.gemm(a, b, ta, tb)
        assert got.shape == (M, N)
        scale = np.sqrt(K) * 1e-5 + 1e-6
        err = np.abs(got - want).max() / scale
        assert err < 4, (each_isa, M, N, K, ta, tb, float(err))


# ---------------------------------------------------------------- AMX (cpu/amx.hpp)
# Shapes with remnants of every block of the AMX GEMM: rows (32 a block), columns (16 and 32 a
# block, 512 a B block), k (32 a chunk, 512 a K block); several B and K blocks; row shares of
# unequal size on two threads.
# AMX takes products of 4e6 flops on one thread, 2.5e7 on two; the last shape is one of those.
AMX_SHAPES = [(32, 32, 2048), (33, 45, 2000), (97, 530, 1025), (1030, 70, 500), (64, 33, 4096),
              (40, 37, 3000), (200, 1100, 513)]


def _normalized_error(got, a, b):
    """max |got - a b| / (|a| |b|): the error of each element against the scale of its own sum
    (float32's dot products stay near 1e-7 by this measure)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return float((np.abs(got - a @ b) / (np.abs(a) @ np.abs(b))).max())


@pytest.fixture
def amx():
    if not amx_usable():
        pytest.skip(f"AMX: {_core.amx_status()}")
    old_isa, old = _core.isa(), _core.amx_enabled()
    _core.set_isa("avx512")
    yield _core.set_amx
    _core.set_amx(old)
    _core.set_isa(old_isa)


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_amx_gemm_keeps_float32_accuracy(ta, tb, amx, threads):
    """Three bfloat16 parts per operand and six products: as accurate as a float32 dot product
    (1e-7 of the sum of |a b|; bf16x3, three products of two parts, would give ~1e-5). The
    largest shape also differs from the FMA GEMM's result, so the AMX path did run."""
    rng = np.random.default_rng(11)
    for n in (1, 2):
        threads(n)
        for M, N, K in AMX_SHAPES:
            a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
            b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
            amx(True)
            got = _core.gemm(a, b, ta, tb)
            amx(False)
            fma = _core.gemm(a, b, ta, tb)
            A, B = (a.T if ta else a), (b.T if tb else b)
            err, err_fma = _normalized_error(got, A, B), _normalized_error(fma, A, B)
            assert err < 5e-7, (n, M, N, K, err, err_fma)
        assert not np.array_equal(got, fma)


def test_amx_gemm_non_finite_where_float32_is(amx):
    """An inf or NaN operand makes the elements it enters non-finite, exactly those that are
    non-finite in float32 (the AMX result may hold NaN where float32 holds +-inf: inf times a
    zero part); the others keep float32 accuracy."""
    rng = np.random.default_rng(5)
    M, N, K = 70, 90, 600
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    a[3, 7], a[40, 100], b[9, 5], b[500, 60] = np.inf, -np.inf, np.nan, np.inf
    b[200, :] = 1.0                        # exact in bfloat16: its other parts are zero
    a[10, 200] = np.inf
    amx(True)
    got = _core.gemm(a, b, False, False)
    with np.errstate(invalid="ignore", over="ignore"):
        want = a.astype(np.float64) @ b.astype(np.float64)
    assert np.array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    assert fin.sum() > M * N // 2
    scale = np.abs(np.nan_to_num(a, posinf=0, neginf=0).astype(np.float64)) @ np.abs(
        np.nan_to_num(b, nan=0, posinf=0, neginf=0).astype(np.float64))
    with np.errstate(invalid="ignore"):
        diff = np.abs(got - want)
    assert float((diff[fin] / scale[fin]).max()) < 5e-7


def test_amx_weight_gradients_accumulate(amx, threads):
    """A layer whose weight gradients go through the AMX GEMM (accumulating: beta = 1): two
    backward calls give twice one call's gradients, and one call matches the FMA GEMM's."""
    import rnncore
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 16, 96)).astype(np.float32)
    for cell in ("LSTM", "GRU", "RNN"):
        layer = getattr(rnncore, cell)(96, 200, seed=1)
        dy = rng.standard_normal((30, 16, 200)).astype(np.float32)
        grads = {}
        for on in (False, True):
            amx(on)
            layer.zero_grad()
            layer.forward(x)
            layer.backward(dy)
            grads[on] = {k: v.copy() for k, v in layer.grads.items()}
        layer.forward(x)
        layer.backward(dy)
        for k, g in layer.grads.items():
            scale = max(1.0, float(np.abs(grads[True][k]).max()))
            assert np.abs(grads[True][k] - grads[False][k]).max() / scale < 2e-5, (cell, k)
            assert np.abs(g - 2 * grads[True][k]).max() / scale < 2e-5, (cell, k)
        assert any(not np.array_equal(grads[True][k], grads[False][k]) for k in grads[True]), cell


def test_amx_switch_and_environment():
    """RNNCORE_AMX=0 switches the AMX GEMM off from the start; set_amx(True) works where AMX is
    usable and otherwise raises a ValueError that says why."""
    r = run_child("from rnncore import _core; print(_core.amx_enabled(), _core.amx_status())",
                  env={"RNNCORE_AMX": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False"), r.stdout
    old = _core.amx_enabled()
    try:
        if amx_usable():
            _core.set_amx(True)
            assert _core.amx_enabled()
        else:
            with pytest.raises(ValueError, match="amx"):
                _core.set_amx(True)
        _core.set_amx(False)
        assert not _core.amx_enabled()
    finally:
        _core.set_amx(old)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_amx_input_projection_kept_copy_follows_switch_and_weights(cell, amx, threads):
    """The fused input projection keeps W_ih's slices packed in AMX's three parts while AMX is
    on and in the FMA layout while it is off: switching repacks (the results are each path's
    own, bit for bit, as a fresh layer's), and so does a change of W_ih in place. Against
    PyTorch as well."""
    import rnncore
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20, 32, 64)).astype(np.float32)
    for n in (1, 2):
        threads(n)
        layer = getattr(rnncore, cell)(64, 128, seed=6)
        out = {}
        for on in (True, False, True):
            amx(on)
            fresh = getattr(rnncore, cell)(64, 128, seed=6)
            y, _ = layer(x)
            np.testing.assert_array_equal(y, fresh(x)[0])
            if on in out:
                np.testing.assert_array_equal(y, out[on])
            out[on] = y
        assert not np.array_equal(out[True], out[False])
        layer.params["weight_ih_l0"][5:40] *= 1.5          # in place: the kept copy must follow
        fresh = getattr(rnncore, cell)(64, 128, seed=6)
        fresh.load_state_dict(layer.state_dict())
        y, _ = layer(x)
        np.testing.assert_array_equal(y, fresh(x)[0])
        # (against float64: PyTorch's own float32 GRU is off by up to 3e-5 in some processes on
        # this machine, where rnncore's result stays within 2e-7 of float64)
        tl = getattr(torch.nn, cell)(64, 128).double()
        tl.load_state_dict({k: torch.from_numpy(np.array(v, np.float64)) for k, v in layer.params.items()})
        yt = tl(torch.from_numpy(x.astype(np.float64)))[0].detach().numpy()
        assert np.abs(y - yt).max() < 2e-6


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_amx_step_product_against_torch_and_kept_copy(cell, amx, threads):
    """From 16 batch rows the forward's per-step product h @ W_hh^T runs on the tile unit, W_hh's
    slices kept in the three parts (a batch of 16 through the 16-row kernel, 40 through the
    32-row one and a 16-row remnant); the backward's per-step product dG @ W_hh too (W_hh's
    columns packed per call). Outputs, final states and every gradient against PyTorch in
    float64 (bidirectional, an entering state, inference and training); switching AMX repacks
    the kept copy (each path's own results, bit for bit, as a fresh layer's) and so does a change
    of W_hh in place; the results differ from the FMA path's, so the tile unit did run."""
    import rnncore
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    I, H = 24, 96                  # (I < 32: the input projection is not on the tile unit)
    # (the backward's dh product: on two threads T=9 pipelines it on one, T=3 splits its columns)
    for n, B, T in itertools.product((1, 2), (16, 40), (9, 3)):
        threads(n)
        if True:
            x = rng.standard_normal((T, B, I)).astype(np.float32)
            h0 = (0.5 * rng.standard_normal((2, B, H))).astype(np.float32)
            st = (h0, h0[::-1].copy()) if cell == "LSTM" else h0
            layer = getattr(rnncore, cell)(I, H, bidirectional=True, seed=3)
            out = {}
            for on in (True, False, True):
                amx(on)
                fresh = getattr(rnncore, cell)(I, H, bidirectional=True, seed=3)
                y, _ = layer(x, st)
                np.testing.assert_array_equal(y, fresh(x, st)[0])
                if on in out:
                    np.testing.assert_array_equal(y, out[on])
                out[on] = y
            assert not np.array_equal(out[True], out[False]), (n, B)
            layer.params["weight_hh_l0"][3:50] *= 1.25        # in place: the kept copy must follow
            layer.params["weight_hh_l0_reverse"][60:] *= 0.75
            fresh = getattr(rnncore, cell)(I, H, bidirectional=True, seed=3)
            fresh.load_state_dict(layer.state_dict())
            y, _ = layer(x, st)
            np.testing.assert_array_equal(y, fresh(x, st)[0])

            tl = getattr(torch.nn, cell)(I, H, bidirectional=True).double()
            tl.load_state_dict({k: torch.from_numpy(np.array(v, np.float64)) for k, v in layer.params.items()})
            xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
            if cell == "LSTM":
                stt = tuple(torch.from_numpy(s.astype(np.float64)).requires_grad_() for s in st)
            else:
                stt = torch.from_numpy(h0.astype(np.float64)).requires_grad_()
            yt, ht = tl(xt, stt)
            dy = rng.standard_normal(yt.shape)
            yt.backward(torch.from_numpy(dy))
            layer.train()
            layer.zero_grad()
            y, hn = layer.forward(x, st)
            assert np.abs(y - yt.detach().numpy()).max() < 2e-6, (n, B, T)
            hts = ht if cell == "LSTM" else (ht,)
            hns = hn if cell == "LSTM" else (hn,)
            for a, b in zip(hns, hts):
                assert np.abs(a - b.detach().numpy()).max() < 2e-6, (n, B, T)
            dx = layer.backward(dy.astype(np.float32))
            dx = dx[0] if isinstance(dx, tuple) else dx
            assert np.abs(dx - xt.grad.numpy()).max() < 2e-5, (n, B, T)
            for k, p in tl.named_parameters():
                g = layer.grads[k]
                scale = max(1.0, float(p.grad.abs().max()))
                assert np.abs(g - p.grad.numpy()).max() / scale < 2e-5, (n, B, T, k)
            amx(False)                      # the backward's product did run on the tile unit
            layer.zero_grad()
            layer.forward(x, st)
            dx_fma = layer.backward(dy.astype(np.float32))
            dx_fma = dx_fma[0] if isinstance(dx_fma, tuple) else dx_fma
            assert not np.array_equal(dx, dx_fma), (n, B, T)
            amx(True)
            layer.eval()
