"""The fast paths stay exact: every ISA this CPU has and several thread counts against the
reference, the stated error of the fast activations, weights never stale after a change,
the streaming fast path, and the benchmark's own NumPy peer."""
import os
import textwrap

import numpy as np
import pytest

import rnncore as rc
from rnncore import _core
from conftest import assert_close
from numpy_ref import ref_forward
from torch_oracle import compare_with_torch

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
    kept = layer._packed
    # packed path at batch 1, short small-batch path (row-major weights in place), packed
    # path at B = 4 and 6 (a few rows against several weight panels at once), 7 and 9; with kept packed weights (the input projected inside the
    # recurrence) and without (packing per call: one GEMM for the input below 8 rows)
    for packed in (kept, None):
        layer._packed = packed
        for T, B in ((30, 1), (6, 3), (17, 4), (11, 6), (25, 7), (13, 9)):
            x = rng.standard_normal((T, B, 20)).astype(np.float32)
            lengths = rng.integers(1, T + 1, B)
            y, _ = layer(x, lengths=lengths)
            yr, _, _ = ref_forward(layer, x, None, lengths)
            assert_close(y, yr, np.float32, f"{cell} T={T} B={B} kept={packed is not None}")


def test_parameter_changes_are_always_seen():
    """Kept packed weights are checked against the weights' content at every call, so a
    change made through params, load_state_dict, an optimizer or in place is seen by the
    very next call, on every path."""
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


def variant_makers(I, H, P, **lstm_kw):
    """Makers (of a dtype) of every cell variant with input I, hidden H (projection P)."""
    return {
        "lstm": lambda dt: rc.LSTM(I, H, dtype=dt, **lstm_kw),
        "gru": lambda dt: rc.GRU(I, H, dtype=dt),
        "gru_orig": lambda dt: rc.GRU(I, H, linear_before_reset=False, dtype=dt),
        "rnn": lambda dt: rc.RNN(I, H, dtype=dt),
        "lstm_proj": lambda dt: rc.LSTM(I, H, proj_size=P, peephole=True, dtype=dt),
    }


KEPT_PACK_LAYERS = variant_makers(20, 128, 40, num_layers=2, bidirectional=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", sorted(KEPT_PACK_LAYERS))
def test_kept_packed_weights_follow_every_change(cell, dtype, threads):
    """The weights are packed once and kept (layer._packed) while their content is unchanged;
    a one-bit in-place edit anywhere in W_hh, W_ih or W_hr, another team size (other slices)
    or an ISA switch makes the next call repack, and every result matches the reference."""
    rng = np.random.default_rng(1)
    layer = KEPT_PACK_LAYERS[cell](dtype)
    # T > 7: the packed path, W_ih packed and kept too (the input is projected per block)
    x = rng.standard_normal((30, 9, 20)).astype(dtype)

    def check(what):
        y, _ = layer(x)
        assert_close(y, ref_forward(layer, x)[0], dtype, f"{cell} {what}")
        return y

    threads(2)
    y0 = check("first call")
    packs = layer._packed.packs
    assert packs > 0 and layer._packed.nbytes > 0
    assert np.array_equal(layer(x)[0], y0) and layer._packed.packs == packs   # reused as is

    # The same content written through params (a change of version, not of content): reused.
    layer.params["weight_hh_l0"] = layer.params["weight_hh_l0"].copy()
    assert np.array_equal(layer(x)[0], y0) and layer._packed.packs == packs

    names = ["weight_hh_l0", "weight_ih_l0"] + (["weight_hr_l0"] if cell == "lstm_proj" else [])
    for name in names:
        w = layer.params[name]
        bits = w.view(np.uint64 if dtype == np.float64 else np.uint32).reshape(-1)
        for flat in (0, bits.size // 2 + 7, bits.size - 1):
            before = layer._packed.packs
            bits[flat] ^= 1                       # the lowest mantissa bit, in place
            layer(x)
            assert layer._packed.packs > before, f"{name}[{flat}] one-bit edit not seen"
            bits[flat] ^= 1
        w.reshape(-1)[5] += 0.5                   # a visible edit, checked against the reference
        check(f"after editing {name} in place")

    # another team: other slices. Four threads: one direction after the other with a team of
    # four (or, where nested OpenMP regions are enabled, both at once with two each); one: a
    # team of one. (Two threads run the directions at once with one thread each: the same
    # slices as one thread.)
    for n in (4, 1):
        threads(n)
        before = layer._packed.packs
        check(f"{n} threads")
        assert layer._packed.packs > before
    old = _core.isa()
    try:
        for isa in _core.available_isas().split(","):
            _core.set_isa(isa)
            check(f"isa {isa}")
    finally:
        _core.set_isa(old)
    layer._packed.clear()
    assert layer._packed.nbytes == 0
    check("after clear")


def test_kept_packed_weights_under_concurrent_calls(threads):
    """Calls on one layer from several Python threads at once (the GIL is released): the
    one that holds the kept packed weights uses them, the others pack for themselves."""
    import concurrent.futures as cf
    threads(2)
    layer = rc.LSTM(16, 64, seed=0)
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((40, 2, 16)).astype(np.float32) for _ in range(6)]
    want = [ref_forward(layer, x)[0] for x in xs]
    with cf.ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda x: layer(x)[0], xs))
            for g, w in zip(got, want):
                assert_close(g, w, np.float32, "concurrent")


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


def test_round_trip_probe():
    """The benchmark's round trip between two threads of the team (through one cache line): a
    positive, finite time with two threads and OpenMP, NaN with one thread; a bad count of
    rounds is refused by name."""
    old = rc.get_num_threads()
    try:
        rc.set_num_threads(2)
        rt = _core.round_trip_ns(2000)
        if rc.info()["openmp"]:
            assert np.isfinite(rt) and 1.0 < rt < 1e7, rt
        else:
            assert np.isnan(rt)
        rc.set_num_threads(1)
        assert np.isnan(_core.round_trip_ns(10))
    finally:
        rc.set_num_threads(old)
    for bad in (0, -3, 10**7 + 1):
        with pytest.raises(ValueError, match="rounds: expected 1 to 10000000"):
            _core.round_trip_ns(bad)


def test_random_configurations_match_reference(threads):
    """Random cells, sizes, layers, directions, dtypes, thread counts and lengths, each layer
    called three times (the kept packed weights reused, then after in-place edits of W_hh and
    W_ih) against the NumPy reference: every path choice of the forward kernel meets every
    other variant somewhere."""
    rng = np.random.default_rng(123)
    for it in range(60):
        cell = str(rng.choice(["LSTM", "GRU", "RNN"]))
        I, H = int(rng.integers(1, 70)), int(rng.integers(1, 150))
        L, bi = int(rng.integers(1, 3)), bool(rng.integers(0, 2))
        T, B = int(rng.integers(1, 40)), int(rng.integers(1, 20))
        kw = {}
        if cell == "LSTM" and H > 2 and rng.integers(0, 3) == 0:
            kw["proj_size"] = int(rng.integers(1, H))
        if cell == "LSTM" and rng.integers(0, 4) == 0:
            kw["peephole"] = True
        if cell == "GRU" and rng.integers(0, 2) == 0:
            kw["linear_before_reset"] = False
        dt = np.float64 if rng.integers(0, 4) == 0 else np.float32
        threads(int(rng.integers(1, 4)))
        layer = getattr(rc, cell)(I, H, num_layers=L, bidirectional=bi, dtype=dt, seed=it, **kw)
        for rep in range(3):
            x = rng.standard_normal((T, B, I)).astype(dt)
            lengths = rng.integers(1, T + 1, B) if rng.integers(0, 2) else None
            if rep == 2:
                for name, delta in (("weight_hh_l0", 0.3), ("weight_ih_l0", -0.3)):
                    w = layer.params[name]
                    w.reshape(-1)[int(rng.integers(0, w.size))] += delta
            y, _ = layer(x, lengths=lengths)
            yr, _, _ = ref_forward(layer, x, None, lengths)
            assert_close(y, yr, dt, f"{cell} I={I} H={H} L={L} bi={bi} T={T} B={B} {kw} {dt} rep={rep}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_orig", "rnn", "lstm_proj_peep"])
def test_step_on_every_isa_against_reference(cell, dtype, each_isa):
    """The streaming step's products sum a register's worth of rows at once (hsum_rows):
    sizes with whole register rows, row and column remnants, on every ISA, against the
    NumPy reference run over the same steps."""
    rng = np.random.default_rng(3)
    for I, H in ((32, 64), (37, 20), (16, 9)):
        make = {
            "lstm": lambda: rc.LSTM(I, H, num_layers=2, dtype=dtype),
            "gru": lambda: rc.GRU(I, H, dtype=dtype),
            "gru_orig": lambda: rc.GRU(I, H, linear_before_reset=False, dtype=dtype),
            "rnn": lambda: rc.RNN(I, H, dtype=dtype),
            "lstm_proj_peep": lambda: rc.LSTM(I, H, proj_size=H // 2 + 1, peephole=True, dtype=dtype),
        }[cell]
        layer = make()
        layer.eval()
        x = rng.standard_normal((5, 3, I)).astype(dtype)
        state = layer.initial_state(3)
        ys = []
        for t in range(5):
            yt, state = layer.step(x[t], state)
            ys.append(yt)
        yr, hr, _ = ref_forward(layer, x, None, None)
        assert_close(np.stack(ys), yr, dtype, f"{cell} I={I} H={H} {each_isa}")


# Training on the packed path keeps the gate activations blocked by the forward's team
# (one contiguous piece per thread and block of steps); the backward reads them with that
# team, or converts them back to row-major when the thread count changed in between.
# B = 9 (8 steps per projected block: T = 19 is two whole blocks and a partial one) and
# B = 5 (a few rows: the per-step products take several weight panels at once), H = 96:
# teams of 2 and 3 with unequal slices.
TRAIN_THREADS = [(2, 2), (3, 3), (3, 2), (2, 1), (1, 3)]


@pytest.mark.parametrize("batch", [9, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fwd_bwd", TRAIN_THREADS)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "lstm_proj"])
def test_packed_path_training_against_torch(cell, fwd_bwd, dtype, batch, threads):
    rng = np.random.default_rng(7)
    make = {"lstm": lambda: rc.LSTM(24, 96, bidirectional=True, dtype=dtype),
            "gru": lambda: rc.GRU(24, 96, bidirectional=True, dtype=dtype),
            "rnn": lambda: rc.RNN(24, 96, num_layers=2, dtype=dtype),
            "lstm_proj": lambda: rc.LSTM(24, 96, proj_size=40, bidirectional=True, dtype=dtype)}
    layer = make[cell]()
    x = rng.standard_normal((19, batch, 24)).astype(dtype)
    threads(fwd_bwd[0])
    compare_with_torch(layer, x, lengths=[19, 3, 11, 19, 1, 8, 16, 19, 9][:batch], rng=rng,
                       between=lambda: threads(fwd_bwd[1]))


@pytest.mark.parametrize("fwd_bwd", TRAIN_THREADS[1:])
@pytest.mark.parametrize("cell", ["gru_orig", "lstm_peep_coupled"])
def test_packed_path_training_variants_across_teams(cell, fwd_bwd, threads):
    """Variants PyTorch lacks: the same gradients as with one thread (whose gate layout is
    row-major; these cells' gradients are checked by finite differences in test_variants)."""
    make = {"gru_orig": lambda: rc.GRU(24, 96, linear_before_reset=False, bidirectional=True,
                                       dtype=np.float64, seed=3),
            "lstm_peep_coupled": lambda: rc.LSTM(24, 96, peephole=True, coupled_gates=True,
                                                 bidirectional=True, dtype=np.float64, seed=3)}
    rng = np.random.default_rng(8)
    x = rng.standard_normal((19, 9, 24))
    dy = rng.standard_normal((19, 9, 192))
    lengths = [19, 3, 11, 19, 1, 8, 16, 19, 9]
    assert_same_grads(make[cell], x, dy, ((1, 1), fwd_bwd), threads, lengths)


def assert_same_grads(make, x, dy, runs, threads, lengths=None):
    """One forward + backward of a fresh layer per (forward threads, backward threads) in
    `runs` (two): the same dx and weight gradients (float64)."""
    results = []
    for f, b in runs:
        layer = make()
        threads(f)
        layer.forward(x, lengths=lengths)
        threads(b)
        dx, _ = layer.backward(dy)
        results.append((dx, {k: v.copy() for k, v in layer.grads.items()}))
    (dx1, g1), (dx2, g2) = results
    np.testing.assert_allclose(dx2, dx1, rtol=1e-10, atol=1e-12)
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-10, atol=1e-12, err_msg=k)


# The pipelined backward (pipe_backward in cpu/impl.hpp): with a team of two, more than four
# batch rows and a whole packed W_hh within the L2, one thread walks the recurrence while the
# other computes the weight and input gradients of the blocks of steps it has finished (in two
# pieces a block, the halves of the gate rows), and the first joins in when it is done. T=40
# B=9: blocks of 5 steps. The forward's team of 2 leaves its gate activations blocked in two
# parts; of 3 or 1, the backward reads them row-major.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fwd_threads", [2, 3, 1])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_pipelined_backward_against_torch(cell, fwd_threads, dtype, threads):
    rng = np.random.default_rng(12)
    make = {"lstm": lambda: rc.LSTM(24, 96, bidirectional=True, dtype=dtype),
            "gru": lambda: rc.GRU(24, 96, bidirectional=True, dtype=dtype),
            "rnn": lambda: rc.RNN(24, 96, num_layers=2, dtype=dtype)}
    layer = make[cell]()
    x = rng.standard_normal((40, 9, 24)).astype(dtype)
    threads(fwd_threads)
    compare_with_torch(layer, x, lengths=[40, 3, 11, 40, 1, 8, 26, 40, 9], rng=rng,
                       between=lambda: threads(2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("steps, batch", [(4, 64), (5, 5), (200, 6)])
def test_pipelined_backward_block_edges(steps, batch, dtype, threads):
    """Blocks of one step (T=4 B=64: four blocks, the fewest pipelined; T=5 B=5), and many
    blocks of 21 rows after the ramp (T=200 B=6), with sequence lengths."""
    rng = np.random.default_rng(14)
    threads(2)
    layer = rc.LSTM(20, 64, dtype=dtype)
    x = rng.standard_normal((steps, batch, 20)).astype(dtype)
    lengths = [steps] + list(rng.integers(1, steps + 1, size=batch - 1))
    compare_with_torch(layer, x, lengths=lengths, rng=rng)


def test_pipelined_backward_beyond_the_l2_at_64_batch_rows():
    """A packed W_hh over 3/4 of the L2 but within twice it is pipelined from 64 batch rows on
    (one core's product then runs at the GEMM's rate from the L3), split below. With
    RNNCORE_L2_BYTES=64 KiB, GRU H=96 (108 KiB packed) and LSTM H=64 (64 KiB), float64 LSTM H=48
    (96 KiB): against PyTorch with lengths at B=64 and B=32, and the path each took (the
    pipeline's weight gradients run on thread 1, the split recurrence's after it on thread 0)."""
    from conftest import run_child
    r = run_child("""
        import sys
        sys.path.insert(0, %r)
        import numpy as np, rnncore as rc
        from torch_oracle import compare_with_torch
        assert rc.info()["l2_cache_bytes"] == 65536
        rc.set_num_threads(2)
        rng = np.random.default_rng(21)
        for make, dtype in ((lambda d: rc.GRU(24, 96, dtype=d), np.float32),
                            (lambda d: rc.LSTM(24, 64, bidirectional=True, dtype=d), np.float32),
                            (lambda d: rc.LSTM(24, 48, dtype=d), np.float64)):
            for batch in (64, 32):
                x = rng.standard_normal((24, batch, 24)).astype(dtype)
                lengths = [24] + list(rng.integers(1, 25, size=batch - 1))
                rc._core.phase_times(True)
                compare_with_torch(make(dtype), x, lengths=lengths, rng=rng)
                on_thread_1 = rc._core.phase_times(True)["backward.weight_grads"][1] > 0
                assert on_thread_1 == (batch == 64), (batch, dtype)
        print("ok")
    """ % os.path.dirname(os.path.abspath(__file__)), env={"RNNCORE_L2_BYTES": "65536", "RNNCORE_PHASES": "1"},
                  timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@pytest.mark.parametrize("cell", ["lstm_peep_coupled", "lstm_peep", "rnn_relu", "gru"])
def test_pipelined_backward_variants(cell, threads):
    """Variants PyTorch lacks (and the GRU, without sequence lengths): the pipelined backward
    (two threads) gives the gradients of one thread's backward (not pipelined)."""
    make = {"lstm_peep_coupled": lambda: rc.LSTM(24, 96, peephole=True, coupled_gates=True,
                                                 dtype=np.float64, seed=3),
            "lstm_peep": lambda: rc.LSTM(24, 96, peephole=True, bidirectional=True,
                                         dtype=np.float64, seed=3),
            "rnn_relu": lambda: rc.RNN(24, 96, nonlinearity="relu", dtype=np.float64, seed=3),
            "gru": lambda: rc.GRU(24, 96, dtype=np.float64, seed=3)}
    rng = np.random.default_rng(13)
    x = rng.standard_normal((40, 9, 24))
    layer0 = make[cell]()
    dy = rng.standard_normal((40, 9, layer0.hidden_size * layer0.num_directions))
    assert_same_grads(make[cell], x, dy, ((1, 1), (2, 2)), threads)


# A recurrence that runs on one thread anyway (a step under 6e4 multiply-adds) takes the
# pipelined backward too where a second thread is free: the weight and input gradients of its
# finished blocks go to that thread. Layers down to one unit (G H under two row tiles: every
# gate row in the first piece), both directions (the reverse one's gates stay blocked by its
# forward's team of one), lengths; B=1..4.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("H", [1, 5, 16, 48])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_pipelined_backward_of_one_thread_recurrences_against_torch(cell, H, dtype, threads):
    rng = np.random.default_rng(H)
    make = {"lstm": rc.LSTM, "gru": rc.GRU, "rnn": rc.RNN}[cell]
    threads(2)
    for B, T in [(1, 37), (3, 40), (4, 9)]:
        layer = make(7, H, bidirectional=True, dtype=dtype, seed=B)
        x = rng.standard_normal((T, B, 7)).astype(dtype)
        lengths = [T] + list(rng.integers(1, T + 1, size=B - 1))
        compare_with_torch(layer, x, lengths=lengths, rng=rng)


@pytest.mark.parametrize("cell", ["lstm_peep_coupled", "rnn_relu", "gru_nobias"])
def test_pipelined_backward_of_one_thread_recurrences_variants(cell, threads):
    """Variants PyTorch lacks: two threads (the pipelined backward of a one-thread recurrence)
    against one (float64)."""
    make = {"lstm_peep_coupled": lambda: rc.LSTM(5, 12, peephole=True, coupled_gates=True,
                                                 dtype=np.float64, seed=4),
            "rnn_relu": lambda: rc.RNN(5, 12, nonlinearity="relu", dtype=np.float64, seed=4),
            "gru_nobias": lambda: rc.GRU(5, 3, bias=False, dtype=np.float64, seed=4)}[cell]
    rng = np.random.default_rng(15)
    x = rng.standard_normal((50, 2, 5))
    dy = rng.standard_normal((50, 2, make().hidden_size))
    assert_same_grads(make, x, dy, ((1, 1), (2, 2)), threads)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_weight_gradients_of_w_ih_and_w_hh_in_one_gemm(cell, threads):
    """dW_ih and dW_hh come from one GEMM over dG^T with the columns of both: here a partial
    last panel of W_ih's part (I = 1000), more panels than one packed B block holds (1400
    columns against 672 per block at a K block of 384) and two K blocks (T * B = 400),
    against PyTorch."""
    threads(2)
    rng = np.random.default_rng(11)
    layer = (rc.LSTM if cell == "lstm" else rc.RNN)(1000, 400, dtype=np.float64)
    compare_with_torch(layer, rng.standard_normal((200, 2, 1000)), rng=rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", ["lstm", "rnn", "gru"])
def test_training_with_padded_gradient_rows_against_torch(cell, dtype, threads):
    """Gate-gradient rows a multiple of 1 KB long are padded by a cache line (G*H = 256 and
    768 here): every reader of them (per-step products, bias sums, weight and input
    gradients) uses the padded stride."""
    threads(2)
    rng = np.random.default_rng(5)
    layer = {"lstm": lambda: rc.LSTM(24, 64, bidirectional=True, dtype=dtype),
             "rnn": lambda: rc.RNN(24, 256, dtype=dtype),
             "gru": lambda: rc.GRU(24, 256, dtype=dtype)}[cell]()
    x = rng.standard_normal((19, 9, 24)).astype(dtype)
    compare_with_torch(layer, x, lengths=[19, 3, 11, 19, 1, 8, 16, 19, 9], rng=rng)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_blocked_gates_read_by_the_small_batch_backward(cell, threads):
    """B <= 4 and 8 <= T <= 16 with kept weights: the forward takes the packed path (gates kept
    blocked by its team of 2), the backward the small-batch path (row-major weights in place),
    which must still read the gates blocked."""
    threads(2)
    rng = np.random.default_rng(2)
    for T, B in ((8, 4), (12, 3), (16, 2)):
        layer = (rc.LSTM if cell == "lstm" else rc.GRU)(24, 128, bidirectional=True)
        compare_with_torch(layer, rng.standard_normal((T, B, 24)).astype(np.float32), rng=rng)


IH_CELLS = variant_makers(64, 40, 24)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", sorted(IH_CELLS))
def test_input_projection_with_w_ih_in_place_or_packed(cell, dtype, each_isa, threads):
    """The packed path reads W_ih in place where I > 5 * T * B (gemm_xwt: rows of W_ih against
    the input rows packed per call, tiles stored transposed) and packs it with W_hh otherwise.
    Both against the reference, alternating on one layer (the kept copy follows the mode),
    with one-bit in-place edits of W_ih: in place they need no repacking and are seen all
    the same; packed they repack."""
    rng = np.random.default_rng(3)
    layer = IH_CELLS[cell](dtype)
    # I = 64: T=8, 12 and 9 at B=1 in place (a panel of 16 input rows padded); T=13 B=1 and
    # T=9 B=2 packed; the short path (T <= 7, B <= 4: row-major weights, nothing kept) at
    # T=5 B=4 and T=7 B=3, 16 rows through the micro-kernel and 4 or 5 left over (products of
    # up to four rows at a time: 4, and 4 + 1)
    shapes = [(8, 1), (13, 1), (12, 1), (9, 2), (9, 1), (5, 4), (7, 3)]
    check_w_ih_edits_seen(layer, cell, dtype, shapes, (2, 1, 3), 40, threads, rng,
                          lambda T, B: 64 > 5 * T * B or (T <= 7 and B <= 4))   # no kept W_ih


def check_w_ih_edits_seen(layer, cell, dtype, shapes, teams, last_rows, threads, rng, in_place):
    """Each (T, B) of shapes with each team: the layer against the reference with sequence
    lengths, then a one-bit in-place edit of W_ih in its last `last_rows` rows (the last gate:
    o, n or the RNN's, acts at every step), which the next call sees, repacking a kept copy of
    W_ih exactly where in_place(T, B) is false. The bit is the lowest of the exponent (the
    weight doubled or halved), in the column of the largest input at a step with an output:
    a mantissa bit of a small weight times a small input can vanish in the output's rounding
    (5 of 16 runs of this file in session 35, with an unseeded layer's weights). The row is
    the first, from a random one on, whose edit moves the float64 reference's output by over
    1e-3: a unit whose gate is saturated at every step with an output (tanh of 8.3 is 1 in
    float32) does not show the edit at all (Cho's GRU I=523, once in the CI of session 37)."""
    I = layer.input_size
    packs = (lambda: layer._packed.packs if layer._packed is not None else 0)
    for n in teams:
        threads(n)
        for T, B in shapes:
            x = rng.standard_normal((T, B, I)).astype(dtype)
            lengths = rng.integers(1, T + 1, B)
            y, _ = layer(x, lengths=lengths)
            ref = ref_forward(layer, x, None, lengths)[0]
            assert_close(y, ref, dtype, f"{cell} T={T} B={B} threads={n}")
            rows = layer.params["weight_ih_l0"].shape[0]
            bits = layer.params["weight_ih_l0"].view(np.uint64 if dtype == np.float64 else np.uint32)
            bit = 1 << (52 if dtype == np.float64 else 23)
            active = np.arange(T)[:, None] < lengths[None, :]
            col = int(np.where(active[..., None], np.abs(x), 0).max(axis=(0, 1)).argmax())
            before = packs()
            start = int(rng.integers(0, last_rows))
            for k in range(last_rows):   # (the reference only: the layer is not called here)
                row = rows - last_rows + (start + k) % last_rows
                bits[row, col] ^= bit
                if np.abs(ref_forward(layer, x, None, lengths)[0] - ref).max() > 1e-3:
                    break
                bits[row, col] ^= bit
            else:
                raise AssertionError(f"{cell} T={T} B={B}: no row of the last {last_rows} whose edit shows")
            y2, _ = layer(x, lengths=lengths)
            assert (packs() == before) == in_place(T, B), f"T={T} B={B}: in place {in_place(T, B)}"
            assert not np.array_equal(y2, y)
            assert_close(y2, ref_forward(layer, x, None, lengths)[0], dtype, f"{cell} T={T} B={B} edited")


DOT_CELLS = variant_makers(523, 40, 24)
DOT_CELLS_WIDE = variant_makers(1040, 20, 8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", sorted(DOT_CELLS))
def test_input_projection_as_dot_products(cell, dtype, each_isa, threads):
    """With 512-bit registers, W_ih read in place (I > 5 * T * B) by 5 or more input rows that do
    not fill whole panels (gemm_xwt_dots; I >= 512; whole panels too from I = 1024): tiles of 4
    input rows by 6 rows of W_ih and every remnant (rows 5, 6, 7, 9: tiles of 1-3; H = 40 over
    1-3 threads: slices whose rows are no multiple of 6, single rows of W_ih), I = 523 (a part
    register of k at the end of every row), the short path (T <= 7) and projected blocks (T=70
    B=1: 64 rows in whole panels, then 6; with I = 1040 both by dots), with sequence lengths,
    both directions, bias and no bias; against the reference at every ISA (the others take the
    panels), float32 and float64, and one-bit edits of W_ih seen at once (nothing derived from
    it is kept)."""
    rng = np.random.default_rng(17)
    layer = DOT_CELLS[cell](dtype)
    shapes = [(5, 1), (6, 1), (7, 1), (9, 1), (25, 1), (3, 3), (13, 2), (19, 3), (70, 1)]
    check_w_ih_edits_seen(layer, cell, dtype, shapes, (1, 2, 3), 20, threads, rng, lambda T, B: True)
    threads(2)
    wide = DOT_CELLS_WIDE[cell](dtype)             # blocks of 64 rows and 6 by dots
    x = rng.standard_normal((70, 1, 1040)).astype(dtype)
    assert_close(wide(x)[0], ref_forward(wide, x)[0], dtype, f"{cell} I=1040")
    both = {"lstm": rc.LSTM, "gru": rc.GRU, "rnn": rc.RNN}.get(cell)
    if both is not None:   # both directions, no bias; training in float64 against PyTorch
        bi = both(523, 40, bidirectional=True, bias=False, dtype=dtype)
        x = rng.standard_normal((9, 2, 523)).astype(dtype)
        assert_close(bi(x)[0], ref_forward(bi, x)[0], dtype, f"{cell} bidirectional")
        if dtype == np.float64:
            compare_with_torch(both(523, 40, dtype=dtype), rng.standard_normal((7, 2, 523)), rng=rng)


IDLE_CELLS = variant_makers(24, 40, 16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", sorted(IDLE_CELLS))
def test_projection_on_the_idle_core(cell, dtype, threads):
    """A layer whose recurrence runs on one thread (few multiply-adds a step) at up to four batch
    rows, with two threads set: the second projects the blocks of input rows into a ring ahead of
    the recurrence (several blocks: T up to 70 at B=1 is 5 blocks of 16 rows; B=3 and 4, lengths).
    Forced on, its output is the same bit for bit as forced off and matches the reference; with
    one thread, or off, it is not taken; by default (auto) it is tried and the output the same."""
    rng = np.random.default_rng(5)
    old = _core.idle_projection()
    omp = int(rc.info()["openmp"])   # (a build without OpenMP has one thread: never taken)
    try:
        layer = IDLE_CELLS[cell](dtype)
        for T, B, lengths in [(17, 1, None), (70, 1, None), (40, 3, [40, 13, 1]), (50, 4, None),
                              (33, 2, [5, 33])]:
            x = rng.standard_normal((T, B, 24)).astype(dtype)
            threads(2)
            _core.set_idle_projection(0)
            runs = _core.idle_projection_runs()
            y0, _ = layer(x, lengths=lengths)
            assert _core.idle_projection_runs() == runs
            _core.set_idle_projection(1)
            y1, _ = layer(x, lengths=lengths)
            assert _core.idle_projection_runs() == runs + omp, (cell, T, B)
            np.testing.assert_array_equal(y1, y0)
            assert_close(y1, ref_forward(layer, x, None, lengths)[0], dtype, f"{cell} T={T} B={B}")
            _core.set_idle_projection(-1)
            for _ in range(3):
                np.testing.assert_array_equal(layer(x, lengths=lengths)[0], y0)
            if T == 17:   # the layer's first calls in auto: it tries the helper first
                assert _core.idle_projection_runs() >= runs + 2 * omp
            threads(1)
            _core.set_idle_projection(1)
            runs = _core.idle_projection_runs()
            np.testing.assert_array_equal(layer(x, lengths=lengths)[0], y0)
            assert _core.idle_projection_runs() == runs       # one thread: no helper
        threads(2)
        _core.set_idle_projection(1)
        short = rng.standard_normal((16, 1, 24)).astype(dtype)   # one block: nothing to hand over
        runs = _core.idle_projection_runs()
        layer(short)
        assert _core.idle_projection_runs() == runs
        if cell == "rnn" and dtype == np.float64:   # its training forward takes it too
            runs = _core.idle_projection_runs()
            compare_with_torch(rc.RNN(24, 40, dtype=dtype), rng.standard_normal((50, 1, 24)), rng=rng)
            assert _core.idle_projection_runs() >= runs + omp
    finally:
        _core.set_idle_projection(old)
    for bad in (-2, 2):
        with pytest.raises(ValueError, match="mode: expected -1"):
            _core.set_idle_projection(bad)


@pytest.mark.parametrize("way, H", [("idle_projection", 40), ("small_team", 64)])
def test_second_thread_asked_for_but_not_given(way, H):
    """Two threads set, but the OpenMP runtime gives the region one (OMP_THREAD_LIMIT=1): the
    idle core's projection or the small layer's team of two, forced on or in auto, runs on the
    one thread (the recurrence projects every block itself, no wait for a helper or a member
    that never comes), in a subprocess with a time limit, against the run with it off."""
    import subprocess
    import sys
    code = textwrap.dedent(f"""
        import numpy as np, rnncore as rc
        from rnncore import _core
        rc.set_num_threads(2)
        layer = rc.LSTM(24, {H}, seed=3)
        x = np.random.default_rng(0).standard_normal((70, 1, 24)).astype(np.float32)
        _core.set_{way}(0)
        y0 = layer(x)[0]
        for mode in (1, -1, -1, -1):
            _core.set_{way}(mode)
            assert np.array_equal(layer(x)[0], y0)
        assert _core.{way}_runs() == 0
        print("ok")
    """)
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# The small layers' team of two: H=48 splits at 16 | 32 units in float64 (whole pairs of
# registers: 24 | 24 would move where the gate passes take one register at a time) and 32 | 16
# in float32, I=24, the projected LSTM's P=40 at 32 | 8 (float32) and 16 | 24 (float64); the
# RNN's H=120 at 64 | 56 (at H=48 its step has too few multiply-adds to share).
TEAM_CELLS = dict(variant_makers(24, 48, 40), rnn=lambda dt: rc.RNN(24, 120, dtype=dt))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", sorted(TEAM_CELLS))
def test_small_layer_on_a_team_of_two(cell, dtype, threads):
    """A layer whose recurrence runs on one thread (a step under 6e4 multiply-adds) may run on a
    team of two in inference (the choice by measured time, or forced): every product summed in
    the one thread's order, so forced on its output and final state are the same bit for bit as
    forced off (with and without the idle core's projection), as the frozen copy's, and match the
    reference, at batch 1-4 with lengths and a given entering state; in auto the layer tries it
    and stays bit-equal; never with one thread, in training, or below 1e4 multiply-adds a step."""
    rng = np.random.default_rng(6)
    old = (_core.small_team(), _core.idle_projection())
    omp = int(rc.info()["openmp"])   # (a build without OpenMP has one thread: never taken)
    try:
        layer = TEAM_CELLS[cell](dtype)
        frozen = layer.frozen()
        for T, B, lengths in [(9, 1, None), (70, 1, None), (40, 3, [40, 13, 1]), (33, 2, [5, 33]),
                              (20, 4, None)]:
            x = rng.standard_normal((T, B, 24)).astype(dtype)
            st = layer.initial_state(B)
            st = tuple(rng.standard_normal(s.shape).astype(dtype) for s in st) if isinstance(st, tuple) \
                else rng.standard_normal(st.shape).astype(dtype)
            threads(2)
            _core.set_idle_projection(0)
            _core.set_small_team(0)
            runs = _core.small_team_runs()
            y0, h0 = layer(x, st, lengths=lengths)
            assert _core.small_team_runs() == runs
            work = B * {"lstm": 4, "lstm_proj": 4, "gru": 3, "gru_orig": 3, "rnn": 1}[cell] * \
                layer.hidden_size * (40 if cell == "lstm_proj" else layer.hidden_size)
            one = work < 6e4                   # (above: a team of two anyway)
            taken = omp if one and work >= 1e4 else 0   # (below 1e4: too few to share)
            for idle in (0, 1):
                _core.set_idle_projection(idle)
                _core.set_small_team(1)
                runs = _core.small_team_runs()
                y1, h1 = layer(x, st, lengths=lengths)
                yf, hf = frozen(x, st, lengths=lengths)
                assert _core.small_team_runs() == runs + 2 * taken, (cell, T, B, idle)
                for a, b in ((y1, y0), (yf, y0), (h1, h0), (hf, h0)):
                    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                        np.testing.assert_array_equal(u, v)
            assert_close(y1, ref_forward(layer, x, st, lengths)[0], dtype, f"{cell} T={T} B={B}")
            _core.set_idle_projection(-1)
            _core.set_small_team(-1)
            runs = _core.small_team_runs()
            for _ in range(4):
                np.testing.assert_array_equal(layer(x, st, lengths=lengths)[0], y0)
            if T == 9:   # the layer's first calls in auto: it tries the team (after one thread)
                assert _core.small_team_runs() >= runs + taken
            threads(1)
            _core.set_small_team(1)
            runs = _core.small_team_runs()
            y, _ = layer(x, st, lengths=lengths)
            assert _core.small_team_runs() == runs       # one thread: no team
            if one:   # (the usual team's split-phase products sum in another order)
                np.testing.assert_array_equal(y, y0)
        threads(2)
        _core.set_small_team(1)
        runs = _core.small_team_runs()
        if cell in ("lstm", "rnn"):   # training keeps one thread: its backward reads its forward's layout
            compare_with_torch(TEAM_CELLS[cell](np.float64), rng.standard_normal((20, 1, 24)), rng=rng)
        small = rc.RNN(24, 64, dtype=dtype)       # 4096 multiply-adds a step: too few to share
        small(rng.standard_normal((30, 1, 24)).astype(dtype))
        assert _core.small_team_runs() == runs
    finally:
        _core.set_small_team(old[0])
        _core.set_idle_projection(old[1])
    for bad in (-2, 2):
        with pytest.raises(ValueError, match="mode: expected -1"):
            _core.set_small_team(bad)


SPREAD_CELLS = variant_makers(40, 256, 96)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", sorted(SPREAD_CELLS))
def test_spread_projection_at_batch_one(cell, dtype, each_isa, threads):
    """At batch 1 the next block of 16 input rows is projected up to four panels of W_ih a step
    beside each step's recurrent product (the split-phase product's two halves each take half
    the tiles; a team of one, one thread's or each direction's of a bidirectional layer, takes
    them in its one sweep; a step without a product, the first from a zero state, projects its
    panels on its own). Spread or not, the output and final state are the
    same bit for bit, and match the reference: both directions, T=32 (two whole blocks), 70 (a
    last block of 6 rows, projected whole) and 100, lengths, an entering state, one and two
    threads, every ISA; T=31 (under two blocks), Cho's GRU and the projected LSTM do not take
    it, nor the upper layer of two run at once (the layer pipeline: the next block's rows may
    not be there yet; a fresh stack, whose lower layer packs first, read them unwritten when it
    did). The RNN's training forward takes it too (float64 against PyTorch)."""
    rng = np.random.default_rng(8)
    old = _core.spread_projection()
    takes = cell in ("lstm", "gru", "rnn")
    try:
        for nth in (2, 1):
            threads(nth)
            for bidir in (False, True):
                layer = {"lstm": lambda dt: rc.LSTM(40, 256, dtype=dt, bidirectional=bidir),
                         "gru": lambda dt: rc.GRU(40, 256, dtype=dt, bidirectional=bidir),
                         "rnn": lambda dt: rc.RNN(40, 256, dtype=dt, bidirectional=bidir)}.get(
                    cell, SPREAD_CELLS[cell])(dtype)
                for T, lengths, given in [(32, None, False), (70, [64], True), (100, None, False), (31, None, False)]:
                    x = rng.standard_normal((T, 1, 40)).astype(dtype)
                    st = None
                    if given:
                        st = layer.initial_state(1)
                        st = tuple(rng.standard_normal(s.shape).astype(dtype) for s in st) \
                            if isinstance(st, tuple) else rng.standard_normal(st.shape).astype(dtype)
                    _core.set_spread_projection(False)
                    runs = _core.spread_projection_runs()
                    y0, h0 = layer(x, st, lengths=lengths)
                    assert _core.spread_projection_runs() == runs
                    _core.set_spread_projection(True)
                    y1, h1 = layer(x, st, lengths=lengths)
                    taken = _core.spread_projection_runs() - runs
                    # (up to four panels of W_ih a step, G * units / panel width over the block's
                    # 16 steps: 4 * 128 / 32 for the LSTM on a team of two with AVX-512 in float32,
                    # 4 * 256 / 32 on one thread or a direction of its own)
                    if takes and T >= 32 and dtype == np.float32 and each_isa.startswith("avx512"):
                        assert taken > 0, (cell, T, nth, bidir)
                    if not takes or T < 32:
                        assert taken == 0, (cell, T, nth)
                    if cell == "rnn" and T >= 32 and each_isa.startswith("avx512"):   # 4-16 panels
                        assert taken > 0, (cell, T, nth, bidir)
                    np.testing.assert_array_equal(y1, y0)
                    for u, v in zip(h1 if isinstance(h1, tuple) else (h1,), h0 if isinstance(h0, tuple) else (h0,)):
                        np.testing.assert_array_equal(u, v)
                    assert_close(y1, ref_forward(layer, x, st, lengths)[0], dtype,
                                 f"{cell} T={T} bidirectional={bidir} threads={nth}")
        threads(2)   # two layers at once (the layer pipeline): the upper one waits for its
        make = {"lstm": rc.LSTM, "gru": rc.GRU, "rnn": rc.RNN}.get(cell, rc.RNN)
        x = rng.standard_normal((60, 1, 16)).astype(dtype)   # input rows: it does not take it
        for k in range(4):   # (a fresh stack's first call: its lower layer packs, the upper runs ahead)
            stack = make(16, 32, num_layers=2, dtype=dtype, seed=k)
            st = stack.initial_state(1)
            st = tuple(rng.standard_normal(s.shape).astype(dtype) for s in st) if isinstance(st, tuple) \
                else rng.standard_normal(st.shape).astype(dtype)
            s0 = st if k % 2 else None
            _core.set_spread_projection(True)
            y1, _ = stack(x, s0)
            _core.set_spread_projection(False)
            np.testing.assert_array_equal(y1, stack(x, s0)[0])
        _core.set_spread_projection(True)
        if cell == "rnn" and dtype == np.float64:   # its training forward takes it too
            runs = _core.spread_projection_runs()
            compare_with_torch(rc.RNN(40, 256, dtype=dtype), rng.standard_normal((40, 1, 40)), rng=rng)
            assert _core.spread_projection_runs() > runs or not each_isa.startswith("avx512")
    finally:
        _core.set_spread_projection(old)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_input_projection_in_place_over_blocks_and_training(cell, threads):
    """W_ih in place across several projected blocks (T=70 at batch 1: 64 + 6 rows, the 6 by
    products of four rows and of two), both directions and two layers, then training in float64
    against PyTorch (the forward's gates kept in the team's blocked layout)."""
    rng = np.random.default_rng(4)
    make = {"lstm": rc.LSTM, "gru": rc.GRU, "rnn": rc.RNN}[cell]
    threads(2)
    layer = make(400, 24, num_layers=2, bidirectional=True)
    x = rng.standard_normal((70, 1, 400)).astype(np.float32)
    y, _ = layer(x)
    assert_close(y, ref_forward(layer, x)[0], np.float32, f"{cell} T=70 I=400")
    layer._packed = None                                              # nothing kept: the same
    np.testing.assert_array_equal(layer(x)[0], y)
    train = make(96, 32, bidirectional=True, dtype=np.float64)      # 96 > 5 * 9 * 1
    compare_with_torch(train, rng.standard_normal((9, 1, 96)), rng=rng)


# The streaming step splits the hidden units over a team once a step has about 1e5
# multiply-adds (step_threads; each layer here has more at batch 1): uneven slices (H = 150:
# 19 registers of units), remnants of a
# register, batch 1 and 3, teams of 1-3 threads, every variant; the projection and Cho's GRU
# meet at a barrier midway. Against the NumPy reference, and the team's result against one
# thread's (the same products per row, so equal to rounding).
@pytest.mark.parametrize("cell", ["lstm", "lstm_proj_peep", "gru", "gru_orig", "rnn", "rnn_relu"])
def test_threaded_step_against_reference(cell, threads):
    rng = np.random.default_rng(11)
    I, H = 64, 150
    make = {"lstm": lambda: rc.LSTM(I, H, num_layers=2),
            "lstm_proj_peep": lambda: rc.LSTM(I, H, proj_size=70, peephole=True),
            "gru": lambda: rc.GRU(I, H),
            "gru_orig": lambda: rc.GRU(I, H, linear_before_reset=False),
            "rnn": lambda: rc.RNN(I, 3 * H),
            "rnn_relu": lambda: rc.RNN(I, 3 * H, nonlinearity="relu")}[cell]
    layer = make()
    layer.eval()
    for B in (1, 3, 5):       # 5: one pass over the weights for four rows, one for the last
        x = rng.standard_normal((6, B, I)).astype(np.float32)
        yr, _, _ = ref_forward(layer, x, None, None)
        got = {}
        for nth in (1, 2, 3):
            threads(nth)
            state = layer.initial_state(B)
            ys = []
            for t in range(6):
                yt, state = layer.step(x[t], state)
                ys.append(yt.copy())
            got[nth] = np.stack(ys)
            assert_close(got[nth], yr, np.float32, f"{cell} B={B} threads={nth}")
        np.testing.assert_allclose(got[2], got[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[3], got[1], rtol=1e-5, atol=1e-6)


# Inference of a bidirectional layer runs both directions at once, one thread each, with two or
# three threads (concurrent_dir_threads: from ~1e5 multiply-adds a call, both directions'
# W_hh within 8 MiB): two layers (the second reads both directions of the first), lengths, a
# given entering state, kept packs (frozen copy) and bfloat16, against the NumPy reference and
# against one thread. The largest layer here (W_hh 2 x 9.8 MiB) runs one direction after the
# other.
@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "gru_orig", "rnn"])
def test_bidirectional_inference_directions_at_once(cell, threads):
    rng = np.random.default_rng(13)
    make = {"lstm": lambda I, H: rc.LSTM(I, H, num_layers=2, bidirectional=True),
            "lstm_proj": lambda I, H: rc.LSTM(I, H, proj_size=H // 3, bidirectional=True),
            "gru": lambda I, H: rc.GRU(I, H, num_layers=2, bidirectional=True),
            "gru_orig": lambda I, H: rc.GRU(I, H, linear_before_reset=False, bidirectional=True),
            "rnn": lambda I, H: rc.RNN(I, H, num_layers=2, bidirectional=True)}[cell]
    for I, H, T, B in ((24, 70, 9, 3), (16, 40, 33, 1)) + (((8, 800, 2, 1),) if cell == "lstm" else ()):
        layer = make(I, H)
        layer.eval()
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        lengths = rng.integers(1, T + 1, B)
        st = layer.initial_state(B)
        st = tuple(rng.standard_normal(s.shape).astype(np.float32) for s in st) if isinstance(st, tuple) \
            else rng.standard_normal(st.shape).astype(np.float32)
        yr, hr, _ = ref_forward(layer, x, st, lengths)
        frozen = layer.frozen()
        got = {}
        for nth in (1, 2, 3):
            threads(nth)
            y, h = layer(x, st, lengths=lengths)
            assert_close(y, yr, np.float32, f"{cell} I={I} H={H} threads={nth}")
            yf, _ = frozen(x, st, lengths=lengths)
            np.testing.assert_array_equal(yf, y)
            got[nth] = y
        np.testing.assert_allclose(got[2], got[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[3], got[1], rtol=1e-5, atol=1e-6)
        # bfloat16 recurrent weights: one thread against two
        layer.inference_precision = "bfloat16"
        threads(1)
        y1, _ = layer(x, st, lengths=lengths)
        threads(2)
        y2, _ = layer(x, st, lengths=lengths)
        np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "gru_orig", "rnn"])
def test_inference_final_states_from_two_state_slots(cell, threads):
    """Inference keeps two steps of h and c (the ring of kernels.hpp), training every step:
    final states and outputs of a call, forward and reverse directions, odd and even T, with
    and without an entering state and lengths, on the unpacked (few rows) and packed paths,
    against the NumPy reference and against the training forward's."""
    rng = np.random.default_rng(29)
    make = {"lstm": lambda: rc.LSTM(12, 40, num_layers=2, bidirectional=True),
            "lstm_proj": lambda: rc.LSTM(12, 40, num_layers=2, proj_size=9, bidirectional=True),
            "gru": lambda: rc.GRU(12, 40, num_layers=2, bidirectional=True),
            "gru_orig": lambda: rc.GRU(12, 40, num_layers=2, linear_before_reset=False, bidirectional=True),
            "rnn": lambda: rc.RNN(12, 40, num_layers=2, bidirectional=True)}[cell]
    layer = make()
    lstm = cell.startswith("lstm")
    for T, B in ((1, 2), (6, 3), (7, 2), (20, 9), (21, 9)):
        for with_state in (False, True):
            for with_lengths in (False, True):
                x = rng.standard_normal((T, B, 12)).astype(np.float32)
                lengths = rng.integers(1, T + 1, B) if with_lengths else None
                st = None
                if with_state:
                    st = layer.initial_state(B)
                    st = tuple(rng.standard_normal(s.shape).astype(np.float32) for s in st) if lstm \
                        else rng.standard_normal(st.shape).astype(np.float32)
                yr, hr, cr = ref_forward(layer, x, st, lengths)
                yt, stt = layer.forward(x, st, lengths=lengths)   # training: every step kept
                for nth in (1, 2):
                    threads(nth)
                    what = f"{cell} T={T} B={B} state={with_state} lengths={with_lengths} threads={nth}"
                    y, sti = layer(x, st, lengths=lengths)
                    assert_close(y, yr, np.float32, what)
                    assert_close(sti[0] if lstm else sti, hr, np.float32, what + " h_n")
                    if lstm:
                        assert_close(sti[1], cr, np.float32, what + " c_n")
                    np.testing.assert_allclose(y, yt, rtol=1e-5, atol=1e-6, err_msg=what)
                    for a, b in zip(sti if lstm else (sti,), stt if lstm else (stt,)):
                        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=what)


def test_recurrence_without_split_phase_product_against_torch():
    """A thread's W_hh slice larger than three quarters of the L2 is read in one sweep per step
    after a full barrier instead of the split-phase product (two halves around the barrier),
    with the input projection after the product, and from 13 rows on the later row tiles of
    each panel prefetch the next one (gemm_pb's stream). RNNCORE_L2_BYTES=0 sends every slice
    that way: forward and backward with teams of 2 and 3 against PyTorch, at batch 1 (rows
    against several panels), 9 (one row tile), 16 (two: one prefetching tile) and 30 (three:
    two prefetching tiles)."""
    from conftest import run_child
    r = run_child("""
        import os, sys
        sys.path.insert(0, %r)
        import numpy as np, rnncore as rc
        from torch_oracle import compare_with_torch
        assert rc.info()["l2_cache_bytes"] == 0
        rng = np.random.default_rng(11)
        for fwd, bwd in ((2, 2), (3, 3), (3, 2)):
            for make in (lambda: rc.LSTM(24, 96, bidirectional=True),
                         lambda: rc.GRU(24, 96, num_layers=2),
                         lambda: rc.RNN(24, 96, bidirectional=True)):
                for batch in (1, 9, 16, 30):
                    layer = make()
                    rc.set_num_threads(fwd)
                    x = rng.standard_normal((17, batch, 24)).astype(np.float32)
                    lengths = ([17, 3, 11, 17, 1, 8, 16, 17, 9] * 4)[:batch]
                    compare_with_torch(layer, x, lengths=lengths, rng=rng,
                                       between=lambda: rc.set_num_threads(bwd))
        print("ok")
    """ % os.path.dirname(os.path.abspath(__file__)), env={"RNNCORE_L2_BYTES": "0"}, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_recurrence_w_hh_in_place_against_torch():
    """At up to four batch rows a W_hh slice larger than twice the L2 is read in
    place (row-major, nothing packed or hashed), by frozen copies too (their results stay the
    layer's bit for bit), and the backward's dh product, past twice the L2, reads W_hh in
    place by rows (each thread its own units' rows, the team's partial sums added over each
    output slice). RNNCORE_L2_BYTES=0 sends every slice both ways: training against
    PyTorch at batch 1-4 with lengths, teams of 2 and 3, every ISA of the CPU; inference against the frozen copy
    (equal) and a bfloat16 layer over the same weights rounded (the packed one-sweep product;
    close); calls alternating between batch 2 (in place) and 9 (packed, kept) with the
    weights edited in place between them."""
    from conftest import run_child
    r = run_child("""
        import os, sys
        sys.path.insert(0, %r)
        import numpy as np, rnncore as rc
        from torch_oracle import compare_with_torch
        rng = np.random.default_rng(12)
        for isa, team in [(isa, team) for isa in rc._core.available_isas().split(",") for team in (2, 3)]:
            rc._core.set_isa(isa)
            rc.set_num_threads(team)
            for make in (lambda: rc.LSTM(24, 96, bidirectional=True),
                         lambda: rc.GRU(24, 96, num_layers=2),
                         lambda: rc.RNN(24, 96, nonlinearity="relu")):
                for batch in (1, 2, 3, 4):
                    layer = make()
                    x = rng.standard_normal((17, batch, 24)).astype(np.float32)
                    lengths = [17, 3, 11, 9][:batch]
                    compare_with_torch(layer, x, lengths=lengths, rng=rng)
                    layer.eval()
                    y, _ = layer(x, lengths=lengths)
                    yf, _ = layer.frozen()(x, lengths=lengths)
                    assert np.array_equal(y, yf)
                    for name, w in layer.params.items():   # exactly representable in bfloat16
                        if "weight_hh" in name:
                            w[...] = (w.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
                    y, _ = layer(x, lengths=lengths)
                    layer.inference_precision = "bfloat16"
                    y16, _ = layer(x, lengths=lengths)
                    np.testing.assert_allclose(y16, y, rtol=1e-5, atol=1e-5)
                layer = make()
                layer.eval()
                x2 = rng.standard_normal((12, 2, 24)).astype(np.float32)
                x9 = rng.standard_normal((12, 9, 24)).astype(np.float32)
                for step in range(4):
                    for name, w in layer.params.items():
                        if "weight_hh" in name:
                            w *= 1.25 if step %% 2 else 0.75
                    x = x9 if step %% 2 else x2
                    y, _ = layer(x)
                    yf, _ = layer.frozen()(x)
                    assert np.array_equal(y, yf)
                    if step == 3:   # against PyTorch after the edits
                        compare_with_torch(layer, x, rng=rng, check_grads=False)
        print("ok")
    """ % os.path.dirname(os.path.abspath(__file__)), env={"RNNCORE_L2_BYTES": "0"}, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_inference_reads_the_kept_slice_where_it_streams_faster():
    """Inference with kept packed weights reads the packed W_hh slice, not W_hh in place, at two
    to four batch rows and at batch 1 from PACKED_HH_MIN_T (40) steps on; shorter batch-1
    calls and every training forward (whose weights change each step) read W_hh in place.
    Seen through the kept copy: an in-place edit of W_hh repacks it on the packed path only
    (in place, nothing derived from W_hh is kept). RNNCORE_L2_BYTES=0 makes every slice large
    enough to be read in place. Each call against the NumPy reference, float32 and float64,
    teams of 1 and 2; the frozen copy (no per-call hash) takes the same path, bit for bit."""
    from conftest import run_child
    r = run_child("""
        import os, sys
        sys.path.insert(0, %r)
        import numpy as np, rnncore as rc
        from conftest import assert_close
        from numpy_ref import ref_forward
        assert rc.info()["l2_cache_bytes"] == 0
        rng = np.random.default_rng(33)
        cases = [(17, 1, False), (39, 1, False), (40, 1, True), (45, 1, True), (17, 2, True),
                 (9, 4, True), (12, 3, True)]
        for dtype in (np.float32, np.float64):
            for team in (1, 2):
                rc.set_num_threads(team)
                for make in (lambda: rc.LSTM(24, 96, dtype=dtype), lambda: rc.GRU(24, 80, dtype=dtype)):
                    layer = make()
                    layer.eval()
                    w = layer.params["weight_hh_l0"]
                    for T, B, packed in cases:
                        x = rng.standard_normal((T, B, 24)).astype(dtype)
                        y, _ = layer(x)
                        assert_close(y, ref_forward(layer, x)[0], dtype, f"T={T} B={B}")
                        before = layer._packed.packs
                        w[5, 3] += 0.5                       # in place, no notification
                        y2, _ = layer(x)
                        assert (layer._packed.packs > before) == packed, (dtype, team, T, B, packed)
                        assert_close(y2, ref_forward(layer, x)[0], dtype, f"T={T} B={B} edited")
                        yf, _ = layer.frozen()(x)
                        assert np.array_equal(yf, y2), (dtype, team, T, B)
                    layer.train()                             # training: W_hh in place
                    for T, B in ((45, 1), (17, 2), (9, 4)):
                        x = rng.standard_normal((T, B, 24)).astype(dtype)
                        layer.forward(x)
                        before = layer._packed.packs
                        w[7, 2] -= 0.25
                        y, _ = layer.forward(x)
                        assert layer._packed.packs == before, ("training", dtype, team, T, B)
                        assert_close(y, ref_forward(layer, x)[0], dtype, f"training T={T} B={B}")
        print("ok")
    """ % os.path.dirname(os.path.abspath(__file__)), env={"RNNCORE_L2_BYTES": "0"}, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_recurrence_in_place_stream_tails_against_torch():
    """At batch 1 the in-place product reads W_hh as one stream, row after row (gemv_stream:
    two accumulators over k, sixteen rows' sums across lanes at once). Widths with every
    remnant (P = 88: a pair of registers and one more; 100 and 47: a part register too; 9:
    a part register only) and unit slices that are not whole registers, float32 and float64,
    every ISA, teams of 1-3, lengths and an entering state: against PyTorch, the frozen
    copy bit for bit."""
    from conftest import run_child
    r = run_child("""
        import os, sys
        sys.path.insert(0, %r)
        import numpy as np, rnncore as rc
        from torch_oracle import compare_with_torch
        assert rc.info()["l2_cache_bytes"] == 0
        rng = np.random.default_rng(21)
        for isa in rc._core.available_isas().split(","):
            rc._core.set_isa(isa)
            for dtype in (np.float32, np.float64):
                for team in (1, 2, 3):
                    rc.set_num_threads(team)
                    for make in (lambda: rc.LSTM(24, 88, dtype=dtype),
                                 lambda: rc.GRU(24, 100, bidirectional=True, dtype=dtype),
                                 lambda: rc.RNN(24, 47, dtype=dtype),
                                 lambda: rc.RNN(5, 9, nonlinearity="relu", dtype=dtype)):
                        layer = make()
                        I = layer.input_size
                        x = rng.standard_normal((19, 1, I)).astype(dtype)   # past SMALL_T
                        compare_with_torch(layer, x, lengths=[19], rng=rng)
                        compare_with_torch(layer, x[:, 0], rng=rng)   # unbatched
                        layer.eval()
                        y, _ = layer(x)
                        yf, _ = layer.frozen()(x)
                        assert np.array_equal(y, yf), (isa, dtype, team, layer)
        print("ok")
    """ % os.path.dirname(os.path.abspath(__file__)), env={"RNNCORE_L2_BYTES": "0"}, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_long_rows_on_every_isa_against_reference(dtype, each_isa, threads):
    """The streaming step reads rows of 512 and more as one stream (gemv_stream): I = 600 and
    H = 530 (remnants of a register pair, of a register and of a part register) at batch 1,
    LSTM, GRU and RNN, one and two threads, against the NumPy reference over the same steps."""
    rng = np.random.default_rng(5)
    for make in (lambda: rc.LSTM(600, 530, dtype=dtype), lambda: rc.GRU(600, 530, dtype=dtype),
                 lambda: rc.RNN(600, 530, dtype=dtype)):
        layer = make()
        layer.eval()
        x = rng.standard_normal((3, 1, 600)).astype(dtype)
        yr, _, _ = ref_forward(layer, x, None, None)
        for nth in (1, 2):
            threads(nth)
            state = layer.initial_state(1)
            ys = []
            for t in range(3):
                yt, state = layer.step(x[t], state)
                ys.append(yt)
            assert_close(np.stack(ys), yr, dtype, f"{type(layer).__name__} threads={nth} {each_isa}")


@pytest.mark.parametrize("value, expect", [("262144", 262144), ("0", 0), ("abc", None), ("-5", None),
                                           ("4096k", None), (str(1 << 31), None)])
def test_l2_cache_bytes_override(value, expect):
    """RNNCORE_L2_BYTES (0 to 1 GiB) sets the L2 size the kernels plan for; anything else is
    ignored for what the OS reports (1 MiB where it reports nothing)."""
    from conftest import run_child
    r = run_child("import rnncore as rc; print(rc.info()['l2_cache_bytes'])", env={"RNNCORE_L2_BYTES": value})
    assert r.returncode == 0, r.stderr
    got = int(r.stdout.strip())
    if expect is None:
        default = run_child("import rnncore as rc; print(rc.info()['l2_cache_bytes'])",
                            env={"RNNCORE_L2_BYTES": ""})
        assert got == int(default.stdout.strip()) and (64 << 10) <= got <= (1 << 30)
    else:
        assert got == expect


def test_phase_times():
    """RNNCORE_PHASES=1 (read once) has the kernels time their phases: every phase of a training
    step is reported per thread of the team and in seconds (the elementwise and matrix phases of
    a batched LSTM take time; their sum is the step's time within its bookkeeping), a
    bidirectional layer (two teams at once) and a second team size add to the same table, reset
    clears it, and the results are the untimed ones bit for bit. Without the variable the
    table is empty."""
    from conftest import run_child
    code = """
        import numpy as np, rnncore as rc, time
        names = ["forward.pack", "forward.projection", "forward.product", "forward.cell", "forward.sync",
                 "backward.pack", "backward.cell", "backward.product", "backward.sync",
                 "backward.weight_grads", "backward.input_grads"]
        rng = np.random.default_rng(3)
        x = rng.standard_normal((30, 16, 24)).astype(np.float32)
        rc.set_num_threads(2)
        layer = rc.LSTM(24, 64, seed=1)
        layer.train()
        t = time.perf_counter()
        y, _ = layer.forward(x)
        dx = layer.backward(np.ones_like(y))[0]
        wall = time.perf_counter() - t
        p = rc._core.phase_times(True)
        if not rc._core.phase_timing():
            assert p == {}, p
        else:
            assert list(p) == names, list(p)
            assert all(len(v) == 2 for v in p.values()), p
            for n in ("forward.projection", "forward.product", "forward.cell", "backward.cell",
                      "backward.product", "backward.weight_grads", "backward.input_grads"):
                # (on some thread: the pipelined backward's weight and input gradients may
                # all fall to thread 1, which runs them beside the recurrence)
                assert max(p[n]) > 0 and min(p[n]) >= 0, (n, p[n])
            assert 0 < sum(v[0] for v in p.values()) <= wall, (p, wall)
            assert all(v == [] for v in rc._core.phase_times(True).values())
            rc.set_num_threads(3)
            bi = rc.GRU(24, 64, bidirectional=True, seed=2)
            bi.train()
            yb, _ = bi.forward(x)
            bi.backward(np.ones_like(yb))
            p = rc._core.phase_times(False)
            assert all(len(v) == 3 for v in p.values()) and p["backward.product"][2] > 0, p
            assert rc._core.phase_times(True) == p
        import hashlib
        print(hashlib.sha256(np.concatenate([y.ravel(), dx.ravel()]).tobytes()).hexdigest())
        print("ok")
    """
    digests = []
    for env in ({"RNNCORE_PHASES": "1"}, {"RNNCORE_PHASES": "0"}, {"RNNCORE_PHASES": ""}):
        r = run_child(code, env=env, timeout=120)
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
        digests.append(r.stdout.split()[-2])
    assert digests[0] == digests[1] == digests[2], digests


_GATES_RSS = r"""
import numpy as np, rnncore as rc
def hwm():   # this process's peak resident set (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
rc.set_num_threads(1)
layer = rc.LSTM(8, 512)
layer.eval()
x = np.zeros((400, 64, 8), np.float32)
r0 = hwm()
y, _ = layer(x)
print(hwm() - r0)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_inference_on_the_packed_path_allocates_no_gate_array():
    """The [T, B, 4H] gate array (400 x 64 x 2048 floats: 200 MiB) is for training and the
    unpacked path only, and so are the [T+1, B, H] arrays of every step's h and c (50 MiB
    each): an inference call on the packed path keeps two steps of state and grows the process
    by its output (50 MiB) and packed weights (~49 MiB here; ~165 with the state arrays,
    ~365 with the gate array too)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _GATES_RSS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grown = float(out.stdout.split()[-1])
    assert 40 < grown < 80, f"RSS grew by {grown:.0f} MiB"
