"""backward(..., input_grad=False): no gradient of the input (its GEMM skipped), every other
gradient unchanged; and the training loops that use it (Sequential.fit, OnlineLearner)."""
import numpy as np
import pytest

import rnncore as rc
from conftest import assert_close
from torch_oracle import compare_with_torch


def make(cell, I, H, L, dtype, bidirectional=False):
    kw = dict(num_layers=L, bidirectional=bidirectional, dtype=dtype, seed=3)
    if cell == "lstm_proj":
        return rc.LSTM(I, H, proj_size=H // 2, **kw)
    return {"lstm": rc.LSTM, "gru": rc.GRU, "rnn": rc.RNN}[cell](I, H, **kw)


# (T, B, I, H, L, bidirectional, lengths): one thread's recurrence with the weight gradients
# pipelined on the second thread (B=1); the layer pipeline's backward (2 layers, B=1);
# a team-of-two recurrence with lengths, both directions; a short sequence.
SHAPES = [(100, 1, 32, 64, 1, False, None), (60, 1, 16, 32, 2, False, None),
          (40, 5, 24, 64, 2, True, [40, 7, 33, 1, 20]), (6, 3, 5, 7, 1, False, None)]


@pytest.mark.parametrize("shape", range(len(SHAPES)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "rnn"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_without_input_grad_against_pytorch(cell, dtype, shape, nthreads, threads):
    """PyTorch with an input that does not require grad is the oracle: y, final states,
    dstate0 and every weight gradient; dx is None."""
    T, B, I, H, L, bi, lengths = SHAPES[shape]
    threads(nthreads)
    layer = make(cell, I, H, L, dtype, bi)
    layer.train()
    x = np.random.default_rng(shape).standard_normal((T, B, I)).astype(dtype)
    compare_with_torch(layer, x, lengths=lengths, rng=np.random.default_rng(7), input_grad=False)


VARIANTS = {
    "peephole_coupled": lambda dt: rc.LSTM(12, 32, num_layers=2, peephole=True, coupled_gates=True,
                                           dtype=dt, seed=1),
    "gru_cho": lambda dt: rc.GRU(12, 32, num_layers=2, linear_before_reset=False, dtype=dt, seed=1),
    "rnn_relu_nobias": lambda dt: rc.RNN(12, 32, num_layers=2, nonlinearity="relu", bias=False,
                                         dtype=dt, seed=1),
    "gru_bidirectional": lambda dt: rc.GRU(12, 32, bidirectional=True, dtype=dt, seed=1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B", [1, 4, 16])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_without_input_grad_variants_match_with(variant, dtype, B, nthreads, threads):
    """Variants PyTorch lacks: the same call with input_grad=True gives the same weight and
    state gradients (and dx, which the other call leaves out)."""
    threads(nthreads)
    rng = np.random.default_rng(B)
    a, b = VARIANTS[variant](dtype), VARIANTS[variant](dtype)
    x = rng.standard_normal((50, B, 12)).astype(dtype)
    y, st = a.forward(x)
    b.forward(x)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, ds_a = a.backward(dy)
    none, ds_b = b.backward(dy, input_grad=False)
    assert none is None and dx.shape == x.shape
    for k in a.grads:
        assert_close(b.grads[k], a.grads[k], dtype, k)
        assert np.abs(a.grads[k]).max() > 0, k
    for u, v in zip(ds_a if isinstance(ds_a, tuple) else (ds_a,),
                    ds_b if isinstance(ds_b, tuple) else (ds_b,)):
        assert_close(v, u, dtype, "dstate0")


@pytest.mark.parametrize("batch_first", [False, True])
def test_without_input_grad_unbatched_and_batch_first(batch_first):
    layer = rc.LSTM(6, 8, batch_first=batch_first, seed=0)
    x = np.random.default_rng(0).standard_normal((9, 6)).astype(np.float32)
    y, _ = layer.forward(x)
    dx, (dh0, dc0) = layer.backward(np.ones_like(y), input_grad=False)
    assert dx is None and dh0.shape == (1, 8) and dc0.shape == (1, 8)
    xb = np.stack([x, x])
    y, _ = layer.forward(xb)
    dx, _ = layer.backward(np.ones_like(y), input_grad=False)
    assert dx is None


@pytest.mark.parametrize("rank", [None, 3])
def test_second_order_without_input_grad(rank):
    rng = np.random.default_rng(2)
    a = rc.SecondOrderRNN(4, 6, rank=rank, seed=0, dtype="float64")
    b = rc.SecondOrderRNN(4, 6, rank=rank, seed=0, dtype="float64")
    x = rng.standard_normal((7, 3, 4))
    y, _ = a.forward(x)
    b.forward(x)
    dy = rng.standard_normal(y.shape)
    dx, dh_a = a.backward(dy)
    none, dh_b = b.backward(dy, input_grad=False)
    assert none is None and dx.shape == x.shape
    np.testing.assert_allclose(dh_b, dh_a, rtol=1e-12, atol=1e-12)
    for k in a.grads:
        np.testing.assert_allclose(b.grads[k], a.grads[k], rtol=1e-12, atol=1e-12)


def models(kind):
    if kind == "lstm_dense":
        return rc.Sequential([rc.LSTM(5, 16, batch_first=True, seed=1), rc.Dense(16, 3, seed=2)])
    if kind == "dense_gru":   # the Dense layer below has weights: the GRU needs its dx
        return rc.Sequential([rc.Dense(5, 8, activation="tanh", seed=1),
                              rc.GRU(8, 16, batch_first=True, seed=2), rc.Dense(16, 3, seed=3)])
    if kind == "onehot_rnn":   # nothing with weights below the RNN
        return rc.Sequential([rc.OneHot(5), rc.Dropout(0.0), rc.RNN(5, 16, batch_first=True, seed=1),
                              rc.Dense(16, 3, seed=2)])
    if kind == "embedding_lstm":
        return rc.Sequential([rc.Embedding(5, 4, seed=1), rc.LSTM(4, 16, num_layers=2, batch_first=True,
                                                                  seed=2), rc.Dense(16, 3, seed=3)])
    raise AssertionError(kind)


def model_input(kind, rng):
    if kind in ("onehot_rnn", "embedding_lstm"):
        return rng.integers(0, 5, (4, 11))
    return rng.standard_normal((4, 11, 5)).astype(np.float32)


@pytest.mark.parametrize("kind", ["lstm_dense", "dense_gru", "onehot_rnn", "embedding_lstm"])
def test_sequential_backward_without_input_grad(kind):
    """Every weight gradient as with the input's gradient; None returned."""
    rng = np.random.default_rng(0)
    a, b = models(kind), models(kind)
    x = model_input(kind, rng)
    out = a.forward(x)[0]
    b.forward(x)
    g = rng.standard_normal(out.shape).astype(np.float32)
    dx = a.backward(g)
    assert b.backward(g, input_grad=False) is None
    if kind in ("lstm_dense", "dense_gru"):
        assert dx.shape == x.shape
    for ba, bb in zip(a.blocks, b.blocks):
        assert set(ba.grads) == set(bb.grads)
        for k in ba.grads:
            assert_close(bb.grads[k], ba.grads[k], np.float32, f"{type(ba).__name__}.{k}")
            assert np.abs(ba.grads[k]).max() > 0


@pytest.mark.parametrize("kind", ["lstm_dense", "dense_gru", "onehot_rnn"])
def test_fit_asks_the_lowest_recurrent_layer_for_no_input_grad(kind, monkeypatch):
    """fit's backward: the recurrent layer with no weights below it computes no dx; one with
    a Dense layer below it still does."""
    m = models(kind)
    rec = m.recurrent_layers[0]
    seen = []
    orig = type(rec).backward

    def spy(self, dy, dstate=None, *, input_grad=True):
        seen.append(input_grad)
        return orig(self, dy, dstate, input_grad=input_grad)
    monkeypatch.setattr(type(rec), "backward", spy)
    rng = np.random.default_rng(1)
    x = model_input(kind, rng)
    y = rng.integers(0, 3, (4, 11))
    hist = m.fit(x, y, loss="cross_entropy", epochs=2, batch_size=2, progress=False)
    assert len(seen) == 4
    assert all(s == (kind == "dense_gru") for s in seen)
    assert np.isfinite(hist.history["loss"]).all()
