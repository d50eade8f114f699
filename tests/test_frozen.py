"""frozen(): inference-only copies of layers and models whose parameters can never change, so
their kept packed weights are reused without the per-call content check; and copies
(deepcopy, pickle) of models that keep assigning into their own blocks."""
import copy
import pickle
import threading

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
    assert frozen._stepper.packed_bytes == 0          # packed at its first step
    x = rng.standard_normal((20, 3, 32)).astype(np.float32)
    state = layer.initial_state(3)
    a, sa = layer.step(x[0], state)
    b, sb = frozen.step(x[0], frozen.initial_state(3))
    assert frozen._stepper.packed_bytes > 0 and layer._stepper.packed_bytes == 0
    # the frozen copy's step runs the fused kernels on its packed weights: the same to rounding
    assert_close(b, a, np.float32, cell)
    for p, q in zip((sa,) if not isinstance(sa, tuple) else sa, (sb,) if not isinstance(sb, tuple) else sb):
        assert_close(q, p, np.float32, cell)
    layer.inference_precision = "bfloat16"
    frozen.inference_precision = "bfloat16"
    assert frozen._packed_bf16.trusted and not layer._packed_bf16.trusted
    assert np.array_equal(frozen(x)[0], layer(x)[0])
    assert np.array_equal(frozen.step(x[0], None)[0], layer.step(x[0], None)[0])


# A frozen copy's step reads its weights packed once for the fused step kernels (the C++
# Model's): on AVX-512 up to three batch rows a fused pass whole and four to six in two halves of
# the accumulators, on AVX2 up to two rows a pass and the row-major step from four rows; the plain
# RNN's units in groups of 4 or 8 vectors. Every variant, sizes that leave partial unit groups,
# batch 1-7 and 13, two layers, float32 and float64 (the C API's step is float32 only), one and
# two threads, every ISA: five steps against the NumPy reference over the same sequence.
STEP_CELLS = {
    "lstm": lambda I, H, dt: rc.LSTM(I, H, num_layers=2, dtype=dt, seed=1),
    "lstm_proj_peep": lambda I, H, dt: rc.LSTM(I, H, proj_size=H // 2 + 1, peephole=True, dtype=dt, seed=2),
    "lstm_coupled": lambda I, H, dt: rc.LSTM(I, H, coupled_gates=True, dtype=dt, seed=3),
    "gru": lambda I, H, dt: rc.GRU(I, H, num_layers=2, dtype=dt, seed=4),
    "gru_orig": lambda I, H, dt: rc.GRU(I, H, linear_before_reset=False, dtype=dt, seed=5),
    "rnn": lambda I, H, dt: rc.RNN(I, H, dtype=dt, seed=6),
    "rnn_relu": lambda I, H, dt: rc.RNN(I, H, nonlinearity="relu", bias=False, dtype=dt, seed=7),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", sorted(STEP_CELLS))
def test_frozen_step_against_reference(cell, dtype, each_isa, threads):
    rng = np.random.default_rng(8)
    for I, H in ((3, 5), (32, 64), (17, 70), (9, 200)):
        frozen = STEP_CELLS[cell](I, H, dtype).frozen()
        for B in (1, 2, 3, 4, 5, 6, 7, 13):
            x = rng.standard_normal((5, B, I)).astype(dtype)
            yr, hr, cr = ref_forward(frozen, x, None, None)
            for n in (1, 2):
                threads(n)
                state = frozen.initial_state(B)
                ys = [frozen.step(x[t], state)[0].copy() for t in range(5)]
                what = f"{cell} I={I} H={H} B={B} threads={n} {each_isa}"
                assert_close(np.stack(ys), yr, dtype, what)
                assert_close(state[0] if isinstance(state, tuple) else state, hr, dtype, what)
                if isinstance(state, tuple):
                    assert_close(state[1], cr, dtype, what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_frozen_step_against_torch(cell, dtype):
    """The plain cells against PyTorch's layer over the same sequence (its outputs and final
    state), batch 1 and 5."""
    torch = pytest.importorskip("torch")
    from torch_oracle import torch_twin
    rng = np.random.default_rng(9)
    frozen = STEP_CELLS[cell](24, 48, dtype).frozen()
    twin = torch_twin(frozen)
    for B in (1, 5):
        x = rng.standard_normal((7, B, 24)).astype(dtype)
        state = frozen.initial_state(B)
        ys = np.stack([frozen.step(x[t], state)[0].copy() for t in range(7)])
        with torch.no_grad():
            yt, st = twin(torch.from_numpy(x))
        assert_close(ys, yt.numpy(), dtype, f"{cell} B={B}")
        for got, want in zip(state if isinstance(state, tuple) else (state,),
                             st if isinstance(st, tuple) else (st,)):
            assert_close(got, want.numpy(), dtype, f"{cell} B={B} state")


def test_frozen_step_keeps_the_kernels_it_packed_for():
    """The packed copy's layout belongs to the kernels active at the first step, which packed
    it: after set_isa the copy's steps still run those kernels, and stay right."""
    isas = rc._core.available_isas().split(",")
    old = rc._core.isa()
    rng = np.random.default_rng(10)
    try:
        for a in isas:
            rc._core.set_isa(a)
            frozen = rc.LSTM(20, 40, seed=11).frozen()
            x = rng.standard_normal((4, 3, 20)).astype(np.float32)
            yr = ref_forward(frozen, x, None, None)[0]
            frozen.step(x[0], frozen.initial_state(3))      # packs under a
            for b in isas:
                rc._core.set_isa(b)
                state = frozen.initial_state(3)
                ys = np.stack([frozen.step(x[t], state)[0].copy() for t in range(4)])
                assert_close(ys, yr, np.float32, f"packed under {a}, stepped under {b}")
    finally:
        rc._core.set_isa(old)


def test_frozen_step_from_many_threads():
    """Threads stepping one frozen copy at once, each with a state of its own, the first
    steps concurrent (the copy packs once, under the GIL-free step): every thread's outputs
    equal a lone run's."""
    rng = np.random.default_rng(12)
    frozen = rc.LSTM(24, 80, num_layers=2, seed=13).frozen()
    x = rng.standard_normal((30, 3, 24)).astype(np.float32)
    want = rc.LSTM(24, 80, num_layers=2, seed=13).frozen()
    state = want.initial_state(3)
    ref = np.stack([want.step(x[t], state)[0].copy() for t in range(30)])
    outs, errors = [None] * 6, []
    start = threading.Barrier(6)

    def run(k):
        try:
            st = frozen.initial_state(3)
            start.wait()
            outs[k] = np.stack([frozen.step(x[t], st)[0].copy() for t in range(30)])
        except Exception as e:   # reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    for k in range(6):
        assert np.array_equal(outs[k], ref), f"thread {k}"


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
