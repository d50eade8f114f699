"""A stack of unidirectional layers whose weights fit in a core's cache runs its layers at
once, one thread a layer, each projecting its input rows as the layer below writes them (the
layer pipeline, cpp/src/layer.cpp), in inference and in training's forward. Every test checks
that the pipeline really ran (`_core.layer_pipeline_runs()`) or really did not, and that its
results (and, training, every gradient) are those of the layer-by-layer order on one thread,
of the NumPy reference and of PyTorch."""
import numpy as np
import pytest
import torch

import rnncore as rc
from conftest import assert_close
from numpy_ref import ref_forward
from torch_oracle import compare_with_torch, torch_twin


def runs():
    return rc._core.layer_pipeline_runs()


def stacks(I, H, L, **kw):
    return {
        "lstm": lambda dt: rc.LSTM(I, H, num_layers=L, dtype=dt, **kw),
        "lstm_proj_peep": lambda dt: rc.LSTM(I, H, num_layers=L, proj_size=H // 2, peephole=True, dtype=dt, **kw),
        "gru": lambda dt: rc.GRU(I, H, num_layers=L, dtype=dt, **kw),
        "gru_orig": lambda dt: rc.GRU(I, H, num_layers=L, linear_before_reset=False, dtype=dt, **kw),
        "rnn": lambda dt: rc.RNN(I, H, num_layers=L, dtype=dt, **kw),
        "rnn_relu_nobias": lambda dt: rc.RNN(I, H, num_layers=L, nonlinearity="relu", bias=False, dtype=dt, **kw),
    }


def random_state(layer, rng, B):
    s = layer.initial_state(B)
    if isinstance(s, tuple):
        return tuple(rng.standard_normal(a.shape).astype(layer.dtype) for a in s)
    return rng.standard_normal(s.shape).astype(layer.dtype)


def flat(out):
    y, s = out
    return [y] + (list(s) if isinstance(s, tuple) else [s])


def pipelined(layer, x, state=None, lengths=None, expect=True):
    """The call on two threads, asserting whether the pipeline ran."""
    before = runs()
    out = layer(x, state, lengths=lengths) if lengths is not None else layer(x, state)
    assert runs() == before + (1 if expect else 0), "the layer pipeline ran" if not expect else "it did not run"
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", sorted(stacks(1, 2, 2)))
@pytest.mark.parametrize("L", [2, 3, 5])
def test_pipeline_matches_layer_by_layer_and_the_reference(cell, L, dtype, threads):
    rng = np.random.default_rng(L)
    layer = stacks(12, 24, L)[cell](dtype)
    layer.eval()
    for T, B in [(32, 1), (57, 3), (100, 2)]:
        for with_state in (False, True):
            what = f"{cell} L={L} T={T} B={B} state={with_state}"
            x = rng.standard_normal((T, B, 12)).astype(dtype)
            state = random_state(layer, rng, B) if with_state else None
            threads(2)
            got = flat(pipelined(layer, x, state))
            threads(1)
            want = flat(pipelined(layer, x, state, expect=False))
            for g, w in zip(got, want):
                assert g.shape == w.shape and g.dtype == w.dtype, what
                assert_close(g, w, dtype, what)
            ref = ref_forward(layer, x, state)
            for g, r in zip(got, ref):
                assert_close(g, r, dtype, what + " against the reference")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "lstm_proj_peep"])
def test_pipeline_against_pytorch(cell, threads):
    if cell == "lstm_proj_peep":   # PyTorch has projections but no peepholes
        make = lambda dt: rc.LSTM(16, 32, num_layers=3, proj_size=16, dtype=dt)
    else:
        make = stacks(16, 32, 3)[cell]
    rng = np.random.default_rng(3)
    threads(2)
    for dtype in (np.float32, np.float64):
        layer = make(dtype)
        layer.eval()
        twin = torch_twin(layer)
        x = rng.standard_normal((64, 2, 16)).astype(dtype)
        state = random_state(layer, rng, 2)
        got = flat(pipelined(layer, x, state))
        with torch.no_grad():
            ts = tuple(torch.from_numpy(a) for a in state) if isinstance(state, tuple) else torch.from_numpy(state)
            want = flat(tuple(o for o in twin(torch.from_numpy(x), ts)))
        for g, w in zip(got, want):
            assert_close(g, w.numpy(), dtype, f"{cell} {dtype.__name__}")


def test_pipeline_with_lengths_frozen_and_bfloat16(threads):
    rng = np.random.default_rng(5)
    layer = rc.LSTM(10, 20, num_layers=3)
    layer.eval()
    x = rng.standard_normal((48, 4, 10)).astype(np.float32)
    lengths = np.array([48, 33, 1, 40])
    threads(2)
    got = flat(pipelined(layer, x, lengths=lengths))
    ref = ref_forward(layer, x, None, lengths=lengths)
    for g, r in zip(got, ref):
        assert_close(g, r, np.float32, "lengths")
    assert np.all(got[0][33:, 1] == 0) and np.all(got[0][1:, 2] == 0)

    frozen = layer.frozen()
    for _ in range(3):   # the kept packed weights, trusted, from call to call
        same = flat(pipelined(frozen, x))
        for g, w in zip(same, flat(layer(x))):
            assert np.array_equal(g, w)

    half = rc.LSTM(10, 20, num_layers=3)
    half.load_state_dict(layer.state_dict())
    half.eval()
    half.inference_precision = "bfloat16"
    b = flat(pipelined(half, x))
    threads(1)
    b1 = flat(pipelined(half, x, expect=False))
    for g, w in zip(b, b1):
        assert_close(g, w, np.float32, "bfloat16 pipelined against one thread")


def test_what_keeps_the_layer_by_layer_order(threads):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 1, 8)).astype(np.float32)
    threads(2)
    small = rc.GRU(8, 16, num_layers=2)
    small.eval()
    pipelined(small, x)
    pipelined(small, x[:31], expect=False)                 # too short a sequence
    pipelined(rc.GRU(8, 16), x, expect=False)              # one layer
    bi = rc.GRU(8, 16, num_layers=2, bidirectional=True)
    bi.eval()
    pipelined(bi, x, expect=False)                         # both directions
    big = rc.LSTM(128, 256, num_layers=2)                  # 2 MiB a layer: the team of two each
    big.eval()
    pipelined(big, rng.standard_normal((40, 1, 128)).astype(np.float32), expect=False)
    big.train()                                            # training: the same rule
    before = runs()
    big.forward(rng.standard_normal((40, 1, 128)).astype(np.float32))
    assert runs() == before
    small.train()
    small.forward(x)
    assert runs() == before + 1
    small.eval()
    threads(1)
    pipelined(small, x, expect=False)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_more_layers_than_threads_and_repeated_calls(n, threads):
    """Layer l on thread l mod n: a thread runs several layers in order, each waiting only for
    the one below; many calls in a row end and agree (no deadlock, no stale progress count)."""
    rng = np.random.default_rng(n)
    layer = rc.LSTM(6, 12, num_layers=7)
    layer.eval()
    x = rng.standard_normal((36, 2, 6)).astype(np.float32)
    threads(1)
    want = flat(pipelined(layer, x, expect=False))
    threads(n)
    for _ in range(20):
        got = flat(pipelined(layer, x))
        for g, w in zip(got, want):
            assert_close(g, w, np.float32, f"threads={n}")


def test_layers_that_fit_half_an_l2_pipeline_on_two_threads(threads):
    """Layers whose step would take a team of two (B G H P >= 6e4) still pipeline where every
    layer's weights fit in half of one core's L2, with no more threads than layers."""
    rng = np.random.default_rng(9)
    for layer, B in [(rc.LSTM(64, 128, num_layers=2), 1), (rc.GRU(32, 100, num_layers=3), 16)]:
        layer.eval()
        x = rng.standard_normal((40, B, layer.input_size)).astype(np.float32)
        threads(2)
        got = flat(pipelined(layer, x))
        ref = ref_forward(layer, x)
        for g, r in zip(got, ref):
            assert_close(g, r, np.float32, type(layer).__name__)
        threads(layer.num_layers + 1)   # more threads than layers: the layers keep their teams
        pipelined(layer, x, expect=False)


# ---------------------------------------------------------------- training (forward + backward)
def backward_runs():
    return rc._core.layer_pipeline_backward_runs()


def backward_pipelines(layer, B):
    """Given a pipelined forward, whether the backward pipelines too: each layer's recurrence
    on one thread (B G H P < 6e4), or up to 4 batch rows."""
    G = {rc.LSTM: 4, rc.GRU: 3, rc.RNN: 1}[type(layer)]
    return B * G * layer.hidden_size * layer.output_size < 6e4 or B <= 4


def train_call(layer, x, state, dy, dstate, lengths=None, expect=True, expect_bwd=None):
    """forward and backward, asserting whether each took the pipeline (the backward's by
    default where the forward's did and backward_pipelines): every output and gradient."""
    if expect_bwd is None:
        expect_bwd = expect and backward_pipelines(layer, x.shape[1])
    layer.zero_grad()
    before, bbefore = runs(), backward_runs()
    y, st = layer.forward(x, state, lengths=lengths)
    assert runs() == before + (1 if expect else 0), "the layer pipeline ran" if not expect else "it did not run"
    dx, dst0 = layer.backward(dy, dstate)
    assert backward_runs() == bbefore + (1 if expect_bwd else 0), \
        "the backward pipeline ran" if not expect_bwd else "the backward pipeline did not run"
    out = flat((y, st)) + [dx] + (list(dst0) if isinstance(dst0, tuple) else [dst0])
    return out + [layer.grads[k].copy() for k in sorted(layer.grads)]


def against_one_thread(a, b, x, state, dy, dstate, threads, what, n=2, **kw):
    """A training step of `a` on n threads (asserting the pipelines as train_call does) against
    one of its twin `b` on one thread (layer by layer): every output and gradient."""
    threads(n)
    got = train_call(a, x, state, dy, dstate, **kw)
    threads(1)
    want = train_call(b, x, state, dy, dstate, expect=False)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, what
        assert_close(g, w, g.dtype.type, f"{what} output {i}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", sorted(stacks(1, 2, 2)))
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_training_pipeline_matches_layer_by_layer(cell, dropout, dtype, threads):
    """Training's forward pipelines too (each layer's output written into the next layer's
    kept input, times its dropout mask), and so does the backward of layers that run on one
    thread each (dx a block at a time, times the mask, for the layer below): outputs, final
    states, dx, dstate0 and every weight gradient equal those of the layer-by-layer order on
    one thread (the same seeded masks)."""
    rng = np.random.default_rng(11)
    for L, T, B, I, H in [(2, 41, 1, 12, 24), (3, 57, 3, 12, 24), (2, 40, 4, 32, 64), (2, 33, 16, 32, 64)]:
        make = stacks(I, H, L, dropout=dropout, seed=5)[cell]
        a, b = make(dtype), make(dtype)   # the same weights and dropout masks
        x = rng.standard_normal((T, B, I)).astype(dtype)
        state = random_state(a, rng, B)
        P = a.output_size
        dy = rng.standard_normal((T, B, P)).astype(dtype)
        dstate = random_state(a, rng, B)
        against_one_thread(a, b, x, state, dy, dstate, threads, f"{cell} L={L} T={T} B={B} dropout={dropout}")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "lstm_proj"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_pipeline_against_pytorch(cell, dtype, threads):
    """PyTorch as the oracle for a pipelined training step of a 3-layer stack: y, final
    states, dx, dstate0 and every weight gradient, with and without lengths."""
    if cell == "lstm_proj":
        layer = rc.LSTM(16, 32, num_layers=3, proj_size=16, dtype=dtype)
    else:
        layer = stacks(16, 32, 3)[cell](dtype)
    layer.train()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((48, 3, 16)).astype(dtype)
    threads(2)
    bbefore = backward_runs()
    for lengths in (None, np.array([48, 20, 33])):
        before = runs()
        compare_with_torch(layer, x, lengths=lengths, rng=rng,
                           between=lambda: pytest.fail("the pipeline did not run") if runs() != before + 1 else None)
    assert backward_runs() == bbefore + 2   # (B G H P < 6e4: the backward's too)


def test_training_pipeline_layers_that_fit_half_an_l2(threads):
    """A stack whose layers take teams of two when run one after the other (LSTM I=64 H=128):
    at batch 1 the backward pipelines too, its layers on one thread each; at batch 8 each
    layer's backward keeps its two threads, its team reading the forward's one-thread gate
    layout as the row-major array it is."""
    rng = np.random.default_rng(12)
    for B in (1, 4, 8):
        a, b = rc.LSTM(64, 128, num_layers=2, seed=3), rc.LSTM(64, 128, num_layers=2, seed=3)
        x = rng.standard_normal((40, B, 64)).astype(np.float32)
        dy = rng.standard_normal((40, B, 128)).astype(np.float32)
        against_one_thread(a, b, x, None, dy, None, threads, f"B={B}")


def test_backward_pipeline_many_layers_and_threads(threads):
    """Layer l's backward on thread (L - 1 - l) mod n, each waiting only for the layer above:
    7 layers on 2, 3 and 4 threads, with dropout, 10 training steps each, against one thread."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((36, 2, 6)).astype(np.float32)
    dy = rng.standard_normal((36, 2, 12)).astype(np.float32)
    for n in (2, 3, 4):
        a = rc.GRU(6, 12, num_layers=7, dropout=0.3, seed=8)
        b = rc.GRU(6, 12, num_layers=7, dropout=0.3, seed=8)
        for _ in range(10):
            against_one_thread(a, b, x, None, dy, None, threads, f"threads={n}", n=n)


def test_backward_pipeline_without_dy_and_short_sequences(threads):
    """dy None (only the final state's gradient), and sequences under 32 steps (both keep the
    layer-by-layer order there)."""
    rng = np.random.default_rng(22)
    for T, expect in [(43, True), (20, False)]:
        a, b = rc.LSTM(5, 10, num_layers=3, seed=2), rc.LSTM(5, 10, num_layers=3, seed=2)
        x = rng.standard_normal((T, 1, 5)).astype(np.float32)
        dstate = random_state(a, rng, 1)
        against_one_thread(a, b, x, None, None, dstate, threads, f"T={T}", expect=expect)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_thread_count_changed_between_forward_and_backward(cell, threads):
    """A pipelined forward then a backward on one thread, and a one-thread forward then a
    pipelined backward: the backward reads the forward's gate activations whichever ran."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((40, 2, 12)).astype(np.float32)
    dy = rng.standard_normal((40, 2, 24)).astype(np.float32)
    make = stacks(12, 24, 3, seed=6)[cell]
    ref = make(np.float32)
    threads(1)
    want = train_call(ref, x, None, dy, None, expect=False)
    for fwd_threads, bwd_threads in [(2, 1), (1, 2)]:
        layer = make(np.float32)
        layer.zero_grad()
        threads(fwd_threads)
        before, bbefore = runs(), backward_runs()
        y, st = layer.forward(x)
        threads(bwd_threads)
        dx, dst0 = layer.backward(dy)
        assert runs() == before + (fwd_threads == 2)
        assert backward_runs() == bbefore + (bwd_threads == 2)
        got = flat((y, st)) + [dx] + (list(dst0) if isinstance(dst0, tuple) else [dst0])
        got += [layer.grads[k].copy() for k in sorted(layer.grads)]
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, np.float32, f"{fwd_threads} -> {bwd_threads} threads, output {i}")
