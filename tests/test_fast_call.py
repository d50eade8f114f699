"""A plain call of a layer (no lengths, time-major, no dropout mask to draw) whose arrays are
already in the layer's form goes straight to the kernels (`Stepper.sequence`, no conversion in
Python); anything else takes the general path, which converts or refuses. Both give the same
results bit for bit, in the same shapes, and those match the NumPy reference."""
import numpy as np
import pytest

import rnncore as rc
from conftest import assert_close
from numpy_ref import ref_forward
from test_speed_paths import variant_makers

LAYERS = {**variant_makers(12, 20, 8),
          **{k + "_2x_bidir": v for k, v in variant_makers(12, 20, 8, num_layers=2, bidirectional=True).items()}}
LAYERS["gru_2x_bidir"] = lambda dt: rc.GRU(12, 20, num_layers=2, bidirectional=True, dtype=dt)
LAYERS["rnn_relu_2x_nobias"] = lambda dt: rc.RNN(12, 20, num_layers=2, nonlinearity="relu", bias=False, dtype=dt)
# T * B against I: the short path (row-major weights) and the packed, kept one
SHAPES = [(1, 1), (5, 3), (30, 2)]


def general(layer, x, state):
    """The general path of a call (conversions in Python, then _core.forward)."""
    out, _, _, _ = layer._run(x, state, None, keep=False)
    return out


def arrays(out):
    y, s = out
    return [y] + (list(s) if isinstance(s, tuple) else [s])


def random_state(layer, rng, B, unbatched):
    s = layer.initial_state(B)
    s = tuple(rng.standard_normal(a.shape).astype(layer.dtype) for a in s) if isinstance(s, tuple) \
        else rng.standard_normal(s.shape).astype(layer.dtype)
    if unbatched:
        s = tuple(a[:, 0, :].copy() for a in s) if isinstance(s, tuple) else s[:, 0, :].copy()
    return s


def same(got, want, what):
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what}: {g.shape} {g.dtype} != {w.shape} {w.dtype}"
        assert np.array_equal(g, w), what


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", sorted(LAYERS))
def test_fast_call_equals_the_general_path(cell, dtype, threads):
    rng = np.random.default_rng(7)
    layer = LAYERS[cell](dtype)
    lstm = isinstance(layer, rc.LSTM)
    for n in (2, 1):
        threads(n)
        for T, B in SHAPES:
            for unbatched in ([False, True] if B == 1 else [False]):
                for with_state in (False, True):
                    what = f"{cell} T={T} B={B} unbatched={unbatched} state={with_state} threads={n}"
                    x = rng.standard_normal((T, B, 12)).astype(dtype)
                    xin = x[:, 0, :].copy() if unbatched else x
                    state = random_state(layer, rng, B, unbatched) if with_state else None
                    fast = layer._stepper.sequence(xin, state, layer._packed)
                    assert fast is not None, what
                    same(arrays(layer(xin, state)), arrays(fast), what)
                    same(arrays(general(layer, xin, state)), arrays(fast), what)
                    if unbatched:
                        st3 = None if state is None else (
                            tuple(a[:, None, :] for a in state) if lstm else state[:, None, :])
                    else:
                        st3 = state
                    ref = ref_forward(layer, x, st3)
                    y = fast[0][:, None, :] if unbatched else fast[0]
                    assert_close(y, ref[0], dtype, what)
                    hn = fast[1][0] if lstm else fast[1]
                    assert_close(hn[:, None, :] if unbatched else hn, ref[1], dtype, what)
                    if lstm:
                        cn = fast[1][1]
                        assert_close(cn[:, None, :] if unbatched else cn, ref[2], dtype, what)


@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "rnn"])
def test_fast_call_of_frozen_and_bfloat16_layers(cell, threads):
    rng = np.random.default_rng(8)
    layer = LAYERS[cell](np.float32)
    frozen = layer.frozen()
    half = LAYERS[cell](np.float32)
    half.load_state_dict(layer.state_dict())
    half.inference_precision = "bfloat16"
    threads(2)
    for T, B in SHAPES:
        x = rng.standard_normal((T, B, 12)).astype(np.float32)
        state = random_state(layer, rng, B, False)
        what = f"{cell} T={T} B={B}"
        fast = frozen._stepper.sequence(x, state, frozen._packed)
        same(arrays(frozen(x, state)), arrays(fast), what)
        same(arrays(general(layer, x, state)), arrays(fast), what)
        fast16 = half._stepper.sequence(x, state, half._packed_bf16, True)
        assert fast16 is not None
        same(arrays(half(x, state)), arrays(fast16), what)
        same(arrays(general(half, x, state)), arrays(fast16), what)
        if T * B > 4:    # the bfloat16 weights differ from the float32 ones
            assert not np.array_equal(fast16[0], fast[0]), what


def test_lstm_fast_call_with_half_a_state():
    rng = np.random.default_rng(9)
    layer = rc.LSTM(12, 20, num_layers=2)
    x = rng.standard_normal((6, 3, 12)).astype(np.float32)
    h, c = random_state(layer, rng, 3, False)
    for state in ((h, None), (None, c), (None, None)):
        fast = layer._stepper.sequence(x, state, layer._packed)
        assert fast is not None
        same(arrays(layer(x, state)), arrays(fast), str([s is None for s in state]))
        same(arrays(general(layer, x, state)), arrays(fast), str([s is None for s in state]))


def test_fast_call_declines_what_needs_the_general_path():
    """None for every input the general path converts or refuses; the layer's call then gives
    the converted input's results, or the general path's error."""
    rng = np.random.default_rng(10)
    layer = rc.GRU(12, 20, num_layers=2)
    lstm = rc.LSTM(12, 20)
    x = rng.standard_normal((6, 3, 12)).astype(np.float32)
    h = random_state(layer, rng, 3, False)
    seq = layer._stepper.sequence
    want = arrays(layer(x, h))
    converted = {
        "x float64": (x.astype(np.float64), h),
        "x Fortran order": (np.asfortranarray(x), h),
        "x strided": (np.repeat(x, 2, axis=2)[:, :, ::2], h),
        "x list": (x.tolist(), h),
        "state float64": (x, h.astype(np.float64)),
        "state strided": (x, np.repeat(h, 2, axis=2)[:, :, ::2]),
        "state one-tuple": (x, (h,)),
    }
    for what, (xa, st) in converted.items():
        assert seq(xa, st, layer._packed) is None, what
        same(arrays(layer(xa, st)), want, what)
    refused = {
        "x 1-D": (x[0, 0], None),
        "x 4-D": (x[None], None),
        "x wrong I": (x[:, :, :11].copy(), None),
        "no steps": (x[:0].copy(), None),
        "no batch": (x[:, :0].copy(), None),
        "state wrong batch": (x, h[:, :2].copy()),
        "state wrong layers": (x, h[:1].copy()),
        "state of an unbatched x": (x[:, 0].copy(), h),
        "state a string": (x, "h"),
    }
    for what, (xa, st) in refused.items():
        assert seq(xa, st, layer._packed) is None, what
        with pytest.raises((ValueError, TypeError)):
            layer(xa, st)
    hc = random_state(lstm, rng, 3, False)
    for what, st in {"LSTM state a list": list(hc), "LSTM state of three": hc + (hc[0],),
                     "LSTM state an array": hc[0]}.items():
        assert lstm._stepper.sequence(x, st, lstm._packed) is None, what
    with pytest.raises(TypeError, match="packed: expected PackedWeights or None"):
        seq(x, h, "packed")
    with pytest.raises(ValueError, match="bfloat16 weights need a float32 layer"):
        rc.GRU(12, 20, dtype="float64")._stepper.sequence(x, None, None, True)


def test_calls_that_take_the_general_path_still_do():
    """lengths, batch_first and dropout masks (training, several layers) keep their paths."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 3, 12)).astype(np.float32)
    layer = rc.LSTM(12, 20, num_layers=2, dropout=0.5, seed=1)
    y_train = layer(x)[0]
    assert not np.array_equal(y_train, layer(x)[0])      # a new mask each call
    layer.eval()
    assert np.array_equal(layer(x)[0], layer._stepper.sequence(x, None, layer._packed)[0])
    lengths = np.array([6, 2, 4])
    y = layer(x, lengths=lengths)[0]
    assert np.all(y[2:, 1] == 0) and np.array_equal(y[:, 0], layer(x)[0][:, 0])
    bf = rc.GRU(12, 20, batch_first=True)
    tm = rc.GRU(12, 20)
    tm.load_state_dict(bf.state_dict())
    same(arrays(bf(np.ascontiguousarray(x.transpose(1, 0, 2)))),
         [np.ascontiguousarray(tm(x)[0].transpose(1, 0, 2)), tm(x)[1]], "batch_first")


@pytest.mark.parametrize("cell", ["lstm", "lstm_proj_2x", "gru", "rnn"])
def test_batch_first_fast_call_of_one_sequence(cell):
    """batch_first: one sequence, (1, T, I), lies as (T, 1, I) does and takes the fast path
    (y (1, T, D*P)); several need the transpose and take the general path. Same results as a
    time-major layer with the same weights."""
    rng = np.random.default_rng(12)
    make = {"lstm": lambda **k: rc.LSTM(12, 20, **k),
            "lstm_proj_2x": lambda **k: rc.LSTM(12, 20, proj_size=8, num_layers=2, bidirectional=True, **k),
            "gru": lambda **k: rc.GRU(12, 20, **k), "rnn": lambda **k: rc.RNN(12, 20, **k)}[cell]
    bf, tm = make(batch_first=True), make()
    tm.load_state_dict(bf.state_dict())
    for B in (1, 3):
        x = rng.standard_normal((7, B, 12)).astype(np.float32)
        xb = np.ascontiguousarray(x.transpose(1, 0, 2))
        state = random_state(tm, rng, B, False)
        fast = bf._stepper.sequence(xb, state, bf._packed, False, True)
        assert (fast is not None) == (B == 1)
        want = arrays(tm(x, state))
        want[0] = np.ascontiguousarray(want[0].transpose(1, 0, 2))
        same(arrays(bf(xb, state)), want, f"{cell} B={B}")
        same(arrays(general(bf, xb, state)), want, f"{cell} B={B}")
        if fast is not None:
            same(arrays(fast), want, f"{cell} B={B}")
        # a time-major (T, 1, I) array handed to a batch-first layer is (B=T, T=1): refused
        # or run as such, never read as time-major
        if B == 1:
            got = bf._stepper.sequence(x, None, bf._packed, False, True)
            assert got is None
        # unbatched (T, I): the same on both layouts
        same(arrays(bf(x[:, 0].copy())), arrays(tm(x[:, 0].copy())), f"{cell} unbatched")
