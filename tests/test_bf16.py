"""inference_precision="bfloat16": the recurrent weights (W_hh, W_hr) rounded to bfloat16 and
streamed at half the bytes in inference. The oracle is the NumPy reference run with those
weights rounded the same way in NumPy (round to nearest even): the kernels widen each bf16
weight to float32 exactly and sum in float32, so they must match it to float32 rounding, on
every ISA and thread count; and they must not match the float32 weights (so the test fails if
the option were ignored)."""
import copy
import pickle

import numpy as np
import pytest

import rnncore
from conftest import assert_close
from numpy_ref import bf16_params, ref_forward, round_bf16
from test_variants import random_state, randomize

LAYERS = {
    "rnn_tanh": lambda **k: rnncore.RNN(5, 24, **k),
    "rnn_relu": lambda **k: rnncore.RNN(5, 24, nonlinearity="relu", **k),
    "lstm": lambda **k: rnncore.LSTM(5, 24, **k),
    "lstm_proj": lambda **k: rnncore.LSTM(5, 24, proj_size=10, **k),
    "lstm_peephole_coupled": lambda **k: rnncore.LSTM(5, 24, peephole=True, coupled_gates=True, **k),
    "gru": lambda **k: rnncore.GRU(5, 24, **k),
    "gru_original": lambda **k: rnncore.GRU(5, 24, linear_before_reset=False, **k),
}


def bf16_reference(layer, x, state=None, lengths=None):
    """The float32 reference with the layer's W_hh and W_hr rounded to bfloat16."""
    twin = copy.deepcopy(layer)
    twin.inference_precision = "float32"
    for k, v in bf16_params(layer.params).items():
        twin.params[k] = v
    return ref_forward(twin, x, state, lengths)


def test_round_bf16_reference():
    """The NumPy rounding the tests compare with: nearest, ties to even, NaN kept."""
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -(1 + 2 ** -8),
                  3.4e38, np.inf, -np.inf, 0.0, -0.0, 2.0 ** -130], np.float32)
    want = np.array([1.0, 1.0, 1 + 4 * 2 ** -8, 1 + 2 * 2 ** -8, -1.0, np.inf, np.inf, -np.inf,
                     0.0, -0.0, 2.0 ** -130], np.float32)
    np.testing.assert_array_equal(round_bf16(x), want)
    assert np.isnan(round_bf16(np.array([np.nan], np.float32)))[0]


def test_kernel_rounds_each_weight_to_nearest_even(each_isa):
    """A one-step ReLU RNN whose state is a unit vector per batch row outputs the columns of
    W_hh as the kernel holds them: bit-exact against round_bf16, ties included."""
    H = 40
    layer = rnncore.RNN(1, H, nonlinearity="relu", bias=False, seed=0)
    rng = np.random.default_rng(3)
    base = (1 + rng.integers(0, 2 ** 7, (H, H)) * 2.0 ** -7).astype(np.float32)
    frac = rng.choice([0.0, 0.5, 0.25, 0.75, 0.5 + 2 ** -10], (H, H)) * 2.0 ** -7
    w = (base + frac * base.astype(np.float32)).astype(np.float32)   # many exact ties
    layer.params["weight_hh_l0"] = w
    layer.params["weight_ih_l0"] = np.zeros((H, 1), np.float32)
    layer.inference_precision = "bfloat16"
    x = np.zeros((1, H, 1), np.float32)
    y, _ = layer(x, np.eye(H, dtype=np.float32)[None])
    np.testing.assert_array_equal(y[0].T, round_bf16(w))
    assert not np.array_equal(round_bf16(w), w)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("TB", [(1, 1), (7, 3), (70, 1), (20, 9)])
def test_against_reference_every_isa(name, TB, each_isa):
    T, B = TB
    rng = np.random.default_rng(11)
    layer = LAYERS[name](seed=0)
    randomize(layer, rng)
    layer.eval()
    x = rng.standard_normal((T, B, 5)).astype(np.float32)
    state = random_state(layer, B, rng)
    layer.inference_precision = "bfloat16"
    y, st = layer(x, state)
    ry, rh, rc = bf16_reference(layer, x, state)
    assert_close(y, ry, np.float32, f"{name} y")
    assert_close(st[0] if isinstance(st, tuple) else st, rh, np.float32, f"{name} h_n")
    if rc is not None:
        assert_close(st[1], rc, np.float32, f"{name} c_n")
    fy, _, _ = ref_forward(layer, x, state)          # the float32 weights: visibly different
    assert np.abs(y - fy).max() > 20 * np.abs(y - ry).max() + 1e-5


@pytest.mark.parametrize("name", ["lstm_proj", "gru", "rnn_tanh"])
@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_stacks_lengths_threads(name, nthreads, threads):
    """Two bidirectional layers, variable lengths, 1-3 threads (the hidden units split over
    them), batch-first input."""
    threads(nthreads)
    rng = np.random.default_rng(5)
    layer = LAYERS[name](num_layers=2, bidirectional=True, batch_first=True, seed=1)
    randomize(layer, rng)
    layer.eval()
    B, T = 6, 13
    x = rng.standard_normal((B, T, 5)).astype(np.float32)
    lengths = np.array([13, 1, 7, 13, 4, 10])
    layer.inference_precision = "bfloat16"
    y, _ = layer(x, lengths=lengths)
    ry, _, _ = bf16_reference(layer, x.transpose(1, 0, 2), lengths=lengths)
    assert_close(y, ry.transpose(1, 0, 2), np.float32, name)


def test_large_layer_against_reference():
    """H=300 (remnant panels, two threads' slices) at batch 1 and 4, T long enough for
    several projected blocks."""
    rng = np.random.default_rng(2)
    layer = rnncore.LSTM(16, 300, seed=0)
    layer.eval()
    layer.inference_precision = "bfloat16"
    for B in (1, 4):
        x = rng.standard_normal((80, B, 16)).astype(np.float32)
        y, _ = layer(x)
        ry, _, _ = bf16_reference(layer, x)
        assert_close(y, ry, np.float32, f"B={B}")


def test_edits_and_switching_are_seen():
    """The bf16 copies are checked against the weights at every call: an in-place edit, a
    load_state_dict and switching back and forth never leave a stale copy."""
    rng = np.random.default_rng(4)
    layer = rnncore.GRU(5, 24, seed=0)
    layer.eval()
    x = rng.standard_normal((9, 2, 5)).astype(np.float32)
    layer.inference_precision = "bfloat16"
    y0, _ = layer(x)
    layer.params["weight_hh_l0"][3, :] += 0.25          # in place
    y1, _ = layer(x)
    assert_close(y1, bf16_reference(layer, x)[0], np.float32, "after an in-place edit")
    assert np.abs(y1 - y0).max() > 1e-3
    other = rnncore.GRU(5, 24, seed=7)
    layer.load_state_dict(other.state_dict())
    assert_close(layer(x)[0], bf16_reference(layer, x)[0], np.float32, "after load_state_dict")
    layer.inference_precision = "float32"
    assert_close(layer(x)[0], ref_forward(layer, x)[0], np.float32, "back to float32")
    layer.inference_precision = "bfloat16"
    assert_close(layer(x)[0], bf16_reference(layer, x)[0], np.float32, "bfloat16 again")


def test_training_stays_float32():
    """forward/backward use the float32 weights whatever inference_precision says."""
    rng = np.random.default_rng(6)
    a = rnncore.LSTM(5, 24, seed=0)
    b = copy.deepcopy(a)
    b.inference_precision = "bfloat16"
    x = rng.standard_normal((8, 3, 5)).astype(np.float32)
    ya, _ = a.forward(x)
    yb, _ = b.forward(x)
    np.testing.assert_array_equal(ya, yb)
    dy = np.ones_like(ya)
    np.testing.assert_array_equal(a.backward(dy)[0], b.backward(dy)[0])
    for k in a.grads:
        np.testing.assert_array_equal(a.grads[k], b.grads[k])


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_step_matches_sequence(cell):
    """step() with bfloat16 weights, one step at a time, equals the whole-sequence call."""
    rng = np.random.default_rng(8)
    layer = getattr(rnncore, cell)(5, 24, num_layers=2, seed=0)
    randomize(layer, rng)
    layer.eval()
    layer.inference_precision = "bfloat16"
    x = rng.standard_normal((6, 2, 5)).astype(np.float32)
    y, _ = layer(x)
    st = layer.initial_state(2)
    for t in range(6):
        yt, st2 = layer.step(x[t], st)
        assert st2 is st                     # the fast path: the state updated in place
        assert_close(yt, y[t], np.float32, f"step {t}")
    for t in range(6):                       # the general path (a state of other arrays)
        st = tuple(np.array(a, np.float64) for a in st) if isinstance(st, tuple) else np.array(st, np.float64)
        yt, st = layer.step(x[t].tolist(), st)
    assert_close(yt, layer(np.concatenate([x, x]))[0][-1], np.float32, "general path")
    layer.inference_precision = "float32"
    assert np.abs(layer(x)[0] - y).max() > 1e-5


def test_sequential_model_and_copies(tmp_path):
    rng = np.random.default_rng(9)
    model = rnncore.Sequential(rnncore.Embedding(11, 5, seed=0), rnncore.GRU(5, 24, batch_first=True, seed=0),
                               rnncore.LSTM(24, 16, batch_first=True, seed=1), rnncore.Dense(16, 11, seed=0))
    model.eval()
    ids = rng.integers(0, 11, (3, 12))
    p32 = model.predict(ids)
    assert model.inference_precision == "float32"
    model.inference_precision = "bfloat16"
    assert model.inference_precision == "bfloat16"
    assert all(b.inference_precision == "bfloat16" for b in model.recurrent_layers)
    p16 = model.predict(ids)
    assert 1e-5 < np.abs(p16 - p32).max() < 0.05
    model.recurrent_layers[0].inference_precision = "float32"
    assert model.inference_precision == "mixed"
    model.inference_precision = "bfloat16"
    twin = copy.deepcopy(model)
    np.testing.assert_allclose(twin.predict(ids), p16, rtol=0, atol=1e-6)
    layer = model.recurrent_layers[1]
    assert pickle.loads(pickle.dumps(layer)).inference_precision == "bfloat16"
    # a runtime setting, not part of the saved file
    model.save(tmp_path / "m.rnnc")
    assert rnncore.load(tmp_path / "m.rnnc").inference_precision == "float32"


def test_bad_values():
    layer = rnncore.LSTM(3, 4)
    for bad in ("bf16", "float16", None, 16):
        with pytest.raises(ValueError, match="inference_precision"):
            layer.inference_precision = bad
    with pytest.raises(ValueError, match="float64"):
        rnncore.GRU(3, 4, dtype="float64").inference_precision = "bfloat16"
    model = rnncore.Sequential(rnncore.LSTM(3, 4, dtype="float64"))
    with pytest.raises(ValueError, match="float64"):
        model.inference_precision = "bfloat16"
    assert model.inference_precision == "float32"
    # the core refuses what the layer never asks for
    from rnncore import _core
    x = np.zeros((2, 1, 3), np.float32)
    with pytest.raises(ValueError, match="recurrent_precision"):
        _core.forward(layer._spec, layer._param_list(), x, keep=True, recurrent_precision="bfloat16")
    with pytest.raises(ValueError, match="recurrent_precision"):
        _core.forward(layer._spec, layer._param_list(), x, recurrent_precision="int8")
    l64 = rnncore.LSTM(3, 4, dtype="float64")
    with pytest.raises(ValueError, match="float64"):
        _core.forward(l64._spec, l64._param_list(), x.astype(np.float64), recurrent_precision="bfloat16")


def test_c_api_model_in_bfloat16(tmp_path):
    """A model saved from Python, loaded by the C API with bfloat16 recurrent weights: predict
    and step match the Python model's bfloat16 outputs (and differ from its float32 ones);
    a bad precision is refused."""
    import ctypes
    from test_native import c_api, fptr
    rng = np.random.default_rng(12)
    model = rnncore.Sequential(rnncore.LSTM(4, 32, num_layers=2, seed=0), rnncore.GRU(32, 24, seed=1),
                               rnncore.Dense(24, 3, seed=2))
    for b in model.recurrent_layers:
        randomize(b, rng)
    model.eval()
    model.save(tmp_path / "m.rnnc")
    x = rng.standard_normal((9, 2, 4)).astype(np.float32)       # time-major for the C API
    xb = np.ascontiguousarray(x.transpose(1, 0, 2))             # Sequential is batch-first
    y32 = model.predict(xb).transpose(1, 0, 2)
    model.inference_precision = "bfloat16"
    y16 = model.predict(xb).transpose(1, 0, 2)
    lib = c_api()
    lib.rnncore_model_load_with_precision.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
    h = ctypes.c_void_p()
    assert lib.rnncore_model_load_with_precision(str(tmp_path / "m.rnnc").encode(), 2, ctypes.byref(h)) == 1
    assert b"recurrent_precision" in lib.rnncore_last_error()
    assert lib.rnncore_model_load_with_precision(str(tmp_path / "m.rnnc").encode(), 1, ctypes.byref(h)) == 0
    try:
        y = np.zeros(y16.shape, np.float32)
        assert lib.rnncore_predict(h, fptr(x), 9, 2, 4, None, fptr(y), y.size) == 0
        assert_close(y, y16, np.float32, "predict")
        assert np.abs(y - y32).max() > 1e-4
        st = ctypes.c_void_p()
        assert lib.rnncore_state_create(h, 2, ctypes.byref(st)) == 0
        try:
            for t in range(9):
                yt = np.zeros((2, 3), np.float32)
                xt = np.ascontiguousarray(x[t])
                assert lib.rnncore_step(h, st, fptr(xt), 2, 4, fptr(yt), yt.size) == 0
                assert_close(yt, y16[t], np.float32, f"step {t}")
        finally:
            lib.rnncore_state_free(st)
    finally:
        lib.rnncore_model_free(h)
