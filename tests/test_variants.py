"""Variants PyTorch lacks (peephole LSTM, coupled-gate LSTM, Cho et al.'s GRU, and their
mix with projection): against a NumPy reference, and gradients against float64 finite
differences. The reference itself is first checked against PyTorch's configurations."""
import numpy as np
import pytest
import torch

import rnncore
from conftest import assert_close, numeric_grad
from numpy_ref import ref_forward
from torch_oracle import torch_twin

VARIANTS = {
    "lstm_peephole": lambda **k: rnncore.LSTM(3, 4, peephole=True, **k),
    "lstm_coupled": lambda **k: rnncore.LSTM(3, 4, coupled_gates=True, **k),
    "lstm_peephole_coupled": lambda **k: rnncore.LSTM(3, 4, peephole=True, coupled_gates=True, **k),
    "lstm_peephole_proj": lambda **k: rnncore.LSTM(3, 4, peephole=True, proj_size=2, **k),
    "lstm_coupled_proj": lambda **k: rnncore.LSTM(3, 4, coupled_gates=True, proj_size=2, **k),
    "lstm_all": lambda **k: rnncore.LSTM(3, 4, peephole=True, coupled_gates=True, proj_size=3, **k),
    "gru_original": lambda **k: rnncore.GRU(3, 4, linear_before_reset=False, **k),
}
STANDARD = {
    "rnn_tanh": lambda **k: rnncore.RNN(3, 4, **k),
    "rnn_relu": lambda **k: rnncore.RNN(3, 4, nonlinearity="relu", **k),
    "lstm": lambda **k: rnncore.LSTM(3, 4, **k),
    "lstm_proj": lambda **k: rnncore.LSTM(3, 4, proj_size=2, **k),
    "gru": lambda **k: rnncore.GRU(3, 4, **k),
}


def random_state(layer, B, rng):
    P = layer.proj_size or layer.hidden_size
    LD = layer.num_layers * layer.num_directions
    h0 = rng.standard_normal((LD, B, P)).astype(layer.dtype)
    if isinstance(layer, rnncore.LSTM):
        return h0, rng.standard_normal((LD, B, layer.hidden_size)).astype(layer.dtype)
    return h0


def randomize(layer, rng, scale=0.6):
    """Larger-than-default weights (and non-trivial peepholes) so every path matters."""
    for k, v in layer.params.items():
        layer.params[k] = rng.uniform(-scale, scale, v.shape)


@pytest.mark.parametrize("name", list(STANDARD))
def test_reference_agrees_with_torch(name):
    rng = np.random.default_rng(0)
    layer = STANDARD[name](num_layers=2, bidirectional=True, dtype="float64", seed=0)
    x = rng.standard_normal((5, 2, 3))
    t = torch_twin(layer)
    y, hn, cn = ref_forward(layer, x)
    yt, st = t(torch.from_numpy(x))
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-12)
    htn = st[0] if isinstance(st, tuple) else st
    np.testing.assert_allclose(hn, htn.detach().numpy(), atol=1e-12)


CONFIGS = [dict(num_layers=1), dict(num_layers=2, bidirectional=True)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_forward_matches_reference(name, cfg, dtype, with_lengths):
    rng = np.random.default_rng(cfg + 10 * with_lengths)
    layer = VARIANTS[name](dtype=dtype, seed=cfg, **CONFIGS[cfg])
    randomize(layer, rng)
    x = rng.standard_normal((6, 3, 3)).astype(dtype)
    state = random_state(layer, 3, rng)
    lengths = np.array([6, 2, 4]) if with_lengths else None
    y, st = layer(x, state, lengths=lengths)
    yr, hr, cr = ref_forward(layer, x, state, lengths)
    assert_close(y, yr, dtype, "y")
    if isinstance(layer, rnncore.LSTM):
        assert_close(st[0], hr, dtype, "h_n")
        assert_close(st[1], cr, dtype, "c_n")
    else:
        assert_close(st, hr, dtype, "h_n")


def finite_difference_check(layer, x, state, lengths, rng, eps=1e-6, tol=1e-7):
    lstm = isinstance(layer, rnncore.LSTM)
    y, st = layer.forward(x, state, lengths=lengths)
    dy = rng.standard_normal(y.shape)
    dh = rng.standard_normal((st[0] if lstm else st).shape)
    dc = rng.standard_normal(st[1].shape) if lstm else None

    def loss():
        yy, ss = layer(x, state, lengths=lengths)
        val = float((yy * dy).sum())
        if lstm:
            return val + float((ss[0] * dh).sum() + (ss[1] * dc).sum())
        return val + float((ss * dh).sum())

    layer.zero_grad()
    dx, ds = layer.backward(dy, (dh, dc) if lstm else dh)

    def fd(arr):
        return numeric_grad(arr, loss, eps)

    def check(got, want, what):
        scale = max(1.0, np.abs(want).max())
        err = np.abs(got - want).max() / scale
        assert err < tol, f"{what}: finite-difference error {err:.3g}"

    for k, p in layer.params.items():
        check(layer.grads[k], fd(p), f"grad {k}")
    check(dx, fd(x), "dx")
    if lstm:
        check(ds[0], fd(state[0]), "dh0")
        check(ds[1], fd(state[1]), "dc0")
    else:
        check(ds, fd(state), "dh0")


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("name", list(VARIANTS) + ["lstm", "gru", "rnn_relu"])
def test_gradients_finite_differences(name, cfg):
    rng = np.random.default_rng(42 + cfg)
    make = VARIANTS.get(name) or STANDARD[name]
    layer = make(dtype="float64", seed=cfg, **CONFIGS[cfg])
    randomize(layer, rng)
    x = rng.standard_normal((5, 2, 3))
    state = random_state(layer, 2, rng)
    finite_difference_check(layer, x, state, np.array([5, 3]), rng)


def test_coupled_gates_ignore_input_gate_rows():
    rng = np.random.default_rng(1)
    layer = rnncore.LSTM(3, 4, coupled_gates=True, dtype="float64")
    x = rng.standard_normal((4, 2, 3))
    y1, _ = layer(x)
    for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        v = layer.params[k].copy()
        v[:4] = rng.standard_normal(v[:4].shape)
        layer.params[k] = v
    y2, _ = layer(x)
    np.testing.assert_array_equal(y1, y2)
    layer.forward(x)
    layer.backward(np.ones_like(y1))
    assert np.all(layer.grads["weight_ih_l0"][:4] == 0)
    assert np.any(layer.grads["weight_ih_l0"][4:] != 0)
