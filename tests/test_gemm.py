"""rnncore's own GEMM (the input projection and the weight and input gradients of BPTT)
against float64 NumPy: every ISA, both operand orders, shapes with remnants of every block
(rows of the micro-kernel, columns of a B panel, the K block, the N block)."""
import numpy as np
import pytest

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
