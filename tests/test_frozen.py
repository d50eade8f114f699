"""frozen(): inference-only copies of layers and models whose parameters can never change, so
their kept packed weights are reused without the per-call content check; and copies
(deepcopy, pickle) of models that keep assigning into their own blocks."""
import copy
import pickle

import numpy as np
import pytest

import rnncore as rc
from conftest import assert_close
from numpy_ref import ref_forward
from test_speed_paths import variant_makers

# I = 64 against T * B: W_ih read in place (T=8, B=1: 64 > 5 * 8) or packed and kept with
# W_hh (T=13, B=1; T=30, B=5); T=5 B=2 is the short path (row-major weights, nothing kept).
FROZEN_CELLS = variant_makers(64, 40, 24, num_layers=2, bidirectional=True)
SHAPES = [(8, 1), (13, 1), (30, 5), (5, 2)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", sorted(FROZEN_CELLS))
def test_frozen_layer_gives_the_originals_results(cell, dtype, threads):
    rng = np.random.default_rng(3)
    layer = FROZEN_CELLS[cell](dtype)
    layer.eval()
    frozen = layer.frozen()
    assert frozen.is_frozen and not layer.is_frozen
    assert frozen._packed.trusted and not layer._packed.trusted
    for n in (2, 1):
        threads(n)
        for T, B in SHAPES:
            x = rng.standard_normal((T, B, 64)).astype(dtype)
            lengths = rng.integers(1, T + 1, B)
            y, _ = layer(x, lengths=lengths)
            yf, _ = frozen(x, lengths=lengths)
            assert np.array_equal(yf, y), f"{cell} T={T} B={B} threads={n}"
            assert_close(yf, ref_forward(frozen, x, None, lengths)[0], dtype, f"{cell} T={T} B={B}")
            # kept and reused: a second call packs nothing
            packs = frozen._packed.packs
            assert np.array_equal(frozen(x, lengths=lengths)[0], y)
            assert frozen._packed.packs == packs


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "lstm_proj"])
def test_frozen_step_and_bfloat16(cell):
    rng = np.random.default_rng(4)
    layer = variant_makers(32, 64, 16)[cell](np.float32)
    frozen = layer.frozen()
    x = rng.standard_normal((20, 3, 32)).astype(np.float32)
    state = layer.initial_state(3)
    a, sa = layer.step(x[0], state)
    b, sb = frozen.step(x[0], frozen.initial_state(3))
    assert np.array_equal(a, b)
    for p, q in zip(np.atleast_1d(sa) if not isinstance(sa, tuple) else sa,
                    np.atleast_1d(sb) if not isinstance(sb, tuple) else sb):
        assert np.array_equal(p, q)
    layer.inference_precision = "bfloat16"
    frozen.inference_precision = "bfloat16"
    assert frozen._packed_bf16.trusted and not layer._packed_bf16.trusted
    assert np.array_equal(frozen(x)[0], layer(x)[0])
    assert np.array_equal(frozen.step(x[0], None)[0], layer.step(x[0], None)[0])


def test_frozen_parameters_can_never_change():
    layer = rc.LSTM(8, 16, seed=0)
    frozen = layer.frozen()
    x = np.random.default_rng(5).standard_normal((12, 2, 8)).astype(np.float32)
    y0 = frozen(x)[0]
    w = frozen.params["weight_hh_l0"]
    with pytest.raises(ValueError, match="read-only"):
        w[0, 0] = 1.0
    with pytest.raises(ValueError, match="WRITEABLE"):
        w.flags.writeable = True
    with pytest.raises(ValueError, match="frozen"):
        frozen.params["weight_hh_l0"] = np.zeros_like(w)
    with pytest.raises(ValueError, match="frozen"):
        frozen.params.touch()
    with pytest.raises(ValueError, match="load_state_dict: this copy is frozen"):
        frozen.load_state_dict(layer.state_dict())
    with pytest.raises(ValueError, match="forward: this copy is frozen"):
        frozen.forward(x)
    with pytest.raises(ValueError, match="backward: this copy is frozen"):
        frozen.backward(np.ones_like(y0))
    with pytest.raises(ValueError, match="train: this copy is frozen"):
        frozen.train()
    for g in frozen.grads.values():
        g.fill(1.0)
    with pytest.raises(ValueError):                     # numpy refuses the in-place update
        rc.optim.SGD(lr=0.1).step(frozen.params, frozen.grads)
    assert np.array_equal(frozen(x)[0], y0)
    frozen.eval()                                       # allowed: it changes nothing

    # The original stays trainable and its edits never reach the copy.
    layer.params["weight_hh_l0"][:] += 0.5
    assert np.array_equal(frozen(x)[0], y0)
    assert not np.allclose(layer(x)[0], y0)
    layer.forward(x)
    layer.backward(np.ones_like(y0))


def test_frozen_copies_stay_frozen(tmp_path):
    layer = rc.GRU(8, 16, num_layers=2, seed=1)
    frozen = layer.frozen()
    x = np.random.default_rng(6).standard_normal((15, 3, 8)).astype(np.float32)
    y0 = frozen(x)[0]
    for c in (copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen)), frozen.frozen()):
        assert c.is_frozen and c._packed.trusted
        assert np.array_equal(c(x)[0], y0)
        with pytest.raises(ValueError, match="read-only"):
            c.params["weight_ih_l1"][0, 0] = 0.0
    frozen.save(tmp_path / "f.rnnc")                    # a loaded file is a trainable layer
    loaded = rc.load(tmp_path / "f.rnnc")
    assert not loaded.is_frozen and np.array_equal(loaded(x)[0], y0)


def make_model(dtype=np.float32):
    return rc.Sequential(rc.Embedding(11, 8, seed=0, dtype=dtype),
                         rc.LSTM(8, 16, batch_first=True, seed=1, dtype=dtype),
                         rc.Dropout(0.2, seed=2),
                         rc.Dense(16, 11, seed=3, dtype=dtype))


def test_frozen_model():
    model = make_model()
    rng = np.random.default_rng(7)
    X, Y = rng.integers(0, 11, (6, 14)), rng.integers(0, 11, (6, 14))
    frozen = model.frozen()
    assert frozen.is_frozen and not model.is_frozen
    assert all(b.is_frozen for b in frozen.blocks) and frozen[1]._packed.trusted
    assert np.array_equal(frozen.predict(X), model.predict(X))
    assert frozen.evaluate(X, Y) == model.evaluate(X, Y)
    assert np.array_equal(frozen.generate([1, 2], 5, seed=0), model.generate([1, 2], 5, seed=0))
    frozen.inference_precision = "bfloat16"
    model.inference_precision = "bfloat16"
    assert np.array_equal(frozen.predict(X), model.predict(X))
    with pytest.raises(ValueError, match="fit: this model is frozen"):
        frozen.fit(X, Y, epochs=1, progress=False)
    with pytest.raises(ValueError, match="frozen"):
        frozen.forward(X)
    with pytest.raises(ValueError, match="frozen"):
        frozen.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="frozen"):
        frozen.params["3.weight"] = np.zeros((11, 16), np.float32)
    g = copy.deepcopy(frozen)
    assert g.is_frozen and g[1]._packed.trusted and np.array_equal(g.predict(X), frozen.predict(X))
    model.fit(X, Y, epochs=1, progress=False)         # the original still trains

    s2s = rc.Seq2Seq(12, 13, embed=8, hidden=16, seed=0)
    f2 = s2s.frozen()
    src = rng.integers(0, 12, (3, 7))
    assert f2.is_frozen
    assert np.array_equal(np.asarray(f2.translate(src, 6, 1, 2), dtype=object),
                          np.asarray(s2s.translate(src, 6, 1, 2), dtype=object))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_model_copies_assign_into_their_own_blocks(how):
    """A copy of a model rebuilds its model-wide parameter dicts over its own blocks: before,
    a copy's load_state_dict reached no block and fit never changed its recurrent layers."""
    model = make_model()
    c = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    sd = {k: np.full_like(v, 0.25) for k, v in c.state_dict().items()}
    c.load_state_dict(sd)
    for b in (c[0], c[1], c[3]):
        for v in b.params.values():
            assert np.all(v == 0.25)
    assert not np.all(model[1].params["weight_hh_l0"] == 0.25)
    rng = np.random.default_rng(8)
    X, Y = rng.integers(0, 11, (4, 10)), rng.integers(0, 11, (4, 10))
    c = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    before = {k: v.copy() for k, v in c.state_dict().items()}
    c.fit(X, Y, epochs=1, batch_size=4, progress=False)
    changed = [k for k, v in c.state_dict().items() if not np.array_equal(v, before[k])]
    assert "1.weight_hh_l0" in changed and "3.weight" in changed, changed
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())
    assert c.params["1.weight_hh_l0"] is c[1].params["weight_hh_l0"]


@pytest.mark.parametrize("make", [lambda: rc.LSTMCell(4, 8, seed=0), lambda: rc.GRUCell(4, 8, seed=0),
                                  lambda: rc.RNNCell(4, 8, seed=0),
                                  lambda: rc.SecondOrderRNN(4, 8, rank=3, seed=0)])
def test_frozen_cells_and_copies_of_cells(make):
    m = make()
    x = np.random.default_rng(9).standard_normal((3, 4)).astype(np.float32)
    if isinstance(m, rc.SecondOrderRNN):
        x = x[:, None, :]                               # (T, B, I)
    y0 = m(x)
    f = m.frozen()
    assert f.is_frozen and not m.is_frozen
    out = f(x)
    for a, b in zip(out if isinstance(out, tuple) else [out], y0 if isinstance(y0, tuple) else [y0]):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="read-only"):
        next(iter(f.params.values()))[...] = 0.0
    with pytest.raises(ValueError, match="forward: this copy is frozen"):
        f.forward(x)
    with pytest.raises(ValueError, match="frozen"):
        f.load_state_dict(m.state_dict())
    assert copy.deepcopy(f).is_frozen
    # A copy computes with its own parameters: editing them changes its results (before, a
    # copied cell's params were arrays its inner layer never read).
    c = copy.deepcopy(m)
    for v in c.params.values():
        v[...] = 0.0
    z = c(x)
    first = z[0] if isinstance(z, tuple) else z
    assert np.all(first == 0.0) or not np.array_equal(first, y0[0] if isinstance(y0, tuple) else y0)
    assert np.array_equal(m(x)[0] if isinstance(y0, tuple) else m(x), y0[0] if isinstance(y0, tuple) else y0)
