"""The fast paths stay exact: every ISA this CPU has and several thread counts against the
reference, the stated error of the fast activations, weights never stale after a change,
the streaming fast path, and the benchmark's own NumPy peer."""
import numpy as np
import pytest

import rnncore as rc
from rnncore import _core
from conftest import assert_close
from numpy_ref import ref_forward

# Stated maximum errors of the float32 fast activations (absolute; both are bounded by 1).
SIGMOID_MAX_ERR = 2e-7
TANH_MAX_ERR = 3e-7


@pytest.mark.parametrize("which, fn, bound", [(0, lambda x: 1 / (1 + np.exp(-x)), SIGMOID_MAX_ERR),
                                              (1, np.tanh, TANH_MAX_ERR)])
def test_fast_activation_error_is_bounded(which, fn, bound, each_isa):
    x = np.concatenate([np.linspace(-30, 30, 200001), np.linspace(-1e-3, 1e-3, 20001),
                        [-100.0, -88.5, 88.5, 100.0, 0.0]]).astype(np.float32)
    got = _core.activations(x, which).astype(np.float64)
    want = fn(x.astype(np.float64))
    err = np.abs(got - want)
    assert err.max() <= bound, (each_isa, float(err.max()), float(x[err.argmax()]))
    # relative accuracy where the values are small
    small = np.abs(want) > 1e-30
    rel = (err[small] / np.abs(want[small]))
    assert np.quantile(rel, 0.999) < 1e-5


@pytest.mark.parametrize("threads_n", [1, 2, 4])
@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_orig", "rnn", "lstm_proj_peep"])
def test_every_isa_and_thread_count_against_reference(cell, threads_n, each_isa, threads):
    threads(threads_n)
    rng = np.random.default_rng(threads_n)
    make = {
        "lstm": lambda: rc.LSTM(20, 48, num_layers=2, bidirectional=True),
        "gru": lambda: rc.GRU(20, 48, num_layers=2, bidirectional=True),
        "gru_orig": lambda: rc.GRU(20, 48, num_layers=2, linear_before_reset=False),
        "rnn": lambda: rc.RNN(20, 48, num_layers=2, nonlinearity="relu"),
        "lstm_proj_peep": lambda: rc.LSTM(20, 48, proj_size=16, peephole=True, coupled_gates=True),
    }[cell]
    layer = make()
    for T, B in ((30, 1), (6, 3), (25, 7)):          # long and short small-batch paths, packed path
        x = rng.standard_normal((T, B, 20)).astype(np.float32)
        lengths = rng.integers(1, T + 1, B)
        y, _ = layer(x, lengths=lengths)
        yr, _, _ = ref_forward(layer, x, None, lengths)
        assert_close(y, yr, np.float32, f"{cell} T={T} B={B}")


def test_parameter_changes_are_always_seen():
    """Nothing derived from the weights outlives a call, so a change made through params,
    load_state_dict, an optimizer or in place is seen by the very next call, on every path."""
    rng = np.random.default_rng(0)
    layer = rc.LSTM(8, 16, seed=0)
    x_long = rng.standard_normal((40, 2, 8)).astype(np.float32)
    x_short = x_long[:3]
    state = tuple(rng.standard_normal(s.shape).astype(np.float32) for s in layer.initial_state(1))

    def outputs():
        st = tuple(s.copy() for s in state)
        return layer(x_long)[0], layer(x_short)[0], layer.step(x_long[0, :1], st)[0]

    def changed(before):
        after = outputs()
        return all(not np.allclose(a, b) for a, b in zip(before, after))

    before = outputs()
    layer.params["weight_hh_l0"] = layer.params["weight_hh_l0"] * 1.5
    assert changed(before)
    before = outputs()
    sd = layer.state_dict()
    sd["weight_ih_l0"] = sd["weight_ih_l0"] + 0.1
    layer.load_state_dict(sd)
    assert changed(before)
    before = outputs()
    for g in layer.grads.values():
        g.fill(0.5)
    rc.optim.SGD(lr=0.1).step(layer.params, layer.grads)
    assert changed(before)
    before = outputs()
    layer.params["bias_hh_l0"][:] += 1.0            # in place, no notification at all
    assert changed(before)
    y = layer(x_long)[0]
    np.testing.assert_allclose(y, ref_forward(layer, x_long)[0], rtol=1e-4, atol=1e-5)


def test_streaming_fast_path_updates_state_in_place():
    layer = rc.GRU(4, 6, num_layers=2, seed=0)
    layer.eval()
    state = layer.initial_state(2)
    x = np.ones((2, 4), np.float32)
    y, st = layer.step(x, state)
    assert st is state and np.any(state != 0)
    keep = state.copy()
    y2, st2 = layer.step(x, st)
    ref_y, ref_st = layer.step(x, keep.astype(np.float64))      # general path (converts)
    np.testing.assert_allclose(y2, ref_y, rtol=1e-6)
    np.testing.assert_allclose(st2, ref_st, rtol=1e-6)
    # a read-only or differently typed state takes the general path and is left alone
    ro = layer.initial_state(2)
    ro.setflags(write=False)
    _, out = layer.step(x, ro)
    assert out is not ro and np.all(ro == 0)


def test_numpy_benchmark_peer_matches():
    from rnncore.bench import numpy_forward, numpy_step
    rng = np.random.default_rng(1)
    for cell in ("LSTM", "GRU", "RNN"):
        layer = getattr(rc, cell)(6, 10, seed=0, dtype="float64")
        x = rng.standard_normal((7, 3, 6))
        y, _ = layer(x)
        np.testing.assert_allclose(numpy_forward(cell, layer.state_dict(), x)[0], y, rtol=1e-10)
        st = layer.initial_state(3)
        st = tuple(s[0] for s in st) if isinstance(st, tuple) else st[0]
        ys = numpy_step(cell, layer.state_dict(), x[0], st)
        ys = ys[0] if isinstance(ys, tuple) else ys
        np.testing.assert_allclose(ys, y[0], rtol=1e-10)


def test_read_bandwidth_probe():
    assert _core.read_bandwidth(64 * 1024, 50) > 1.0
