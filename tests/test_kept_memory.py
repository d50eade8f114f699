"""The buffers the core keeps between calls (inference's activations, the backward's gradient
buffers, a spare training cache): trimmed to the last call's sizes after 8 calls in a row that
used under a quarter of them (and only where they hold 16 MiB or more), and freed by
`rnncore.release_memory()`: the calling thread's at once, every other thread's at the start of
its next call. Results never change."""
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import rnncore as rc


def _x(T, B, I, seed=0):
    return np.random.default_rng(seed).standard_normal((T, B, I)).astype(np.float32)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_release_frees_this_threads_buffers_and_changes_no_result(cell):
    rc.release_memory()
    assert rc.kept_memory() == 0
    lay = getattr(rc, cell)(16, 32, num_layers=2, seed=1)
    lay.eval()
    x = _x(40, 8, 16)
    y0, _ = lay(x)
    kept = rc.kept_memory()
    assert kept >= 40 * 8 * 32 * 4, kept           # at least the layers' outputs
    rc.release_memory()
    assert rc.kept_memory() == 0
    y1, _ = lay(x)
    np.testing.assert_array_equal(y0, y1)
    # training: the spare cache and the backward's buffers, then released
    lay.train()
    dy = np.ones_like(y0)
    lay.zero_grad()
    y2, _ = lay.forward(x)
    lay.backward(dy)
    g0 = {k: v.copy() for k, v in lay.grads.items()}
    assert rc.kept_memory() > kept
    rc.release_memory()
    assert rc.kept_memory() == 0
    lay.zero_grad()
    y3, _ = lay.forward(x)
    lay.backward(dy)
    np.testing.assert_array_equal(y2, y3)
    for k, v in lay.grads.items():
        np.testing.assert_array_equal(v, g0[k])


def test_a_forward_kept_across_a_release_still_backpropagates():
    lay = rc.GRU(8, 24, seed=2)
    x, dy = _x(30, 4, 8), np.ones((30, 4, 24), np.float32)
    lay.zero_grad()
    lay.forward(x)
    lay.backward(dy)
    want = {k: v.copy() for k, v in lay.grads.items()}
    lay.zero_grad()
    lay.forward(x)              # its activations are in a cache the layer holds
    rc.release_memory()          # (frees the spare, not a cache in use)
    lay(_x(5, 2, 8))             # another call in between
    lay.backward(dy)
    for k, v in lay.grads.items():
        np.testing.assert_array_equal(v, want[k])
    # a cache taken before a release is freed, not kept as the spare, when its backward ends
    rc.release_memory()
    lay.forward(x)
    rc.release_memory()
    lay.backward(dy)
    without_spare = rc.kept_memory()
    lay.forward(x)
    lay.backward(dy)
    assert rc.kept_memory() >= without_spare + 30 * 4 * 3 * 24 * 4   # now the spare (its gates)


def test_other_threads_release_at_their_next_call():
    lay = rc.LSTM(16, 64, num_layers=2, seed=3)   # inference keeps the first layer's output
    lay.eval()
    big, small = _x(200, 32, 16), _x(3, 1, 16)
    seen = {}
    go, done = threading.Event(), threading.Event()

    def worker():
        lay(big)
        seen["big"] = rc.kept_memory()
        done.set()
        go.wait()
        seen["before"] = rc.kept_memory()   # release_memory() came from another thread
        lay(small)
        seen["small"] = rc.kept_memory()

    t = threading.Thread(target=worker)
    t.start()
    done.wait()
    rc.release_memory()
    go.set()
    t.join()
    assert seen["before"] == seen["big"] > 200 * 32 * 64 * 4
    assert 0 < seen["small"] < seen["big"] / 20, seen


def test_release_while_other_threads_run_calls():
    # In a child process: two threads run inference and training calls while a third releases
    # over and over; every result must equal the single-threaded one, and nothing may crash.
    code = textwrap.dedent("""
        import threading, numpy as np, rnncore as rc
        rc.set_num_threads(1)
        lays = [rc.LSTM(8, 32, num_layers=2, seed=4), rc.GRU(8, 32, seed=5)]
        x = np.random.default_rng(0).standard_normal((20, 3, 8)).astype(np.float32)
        dy = np.ones((20, 3, 32), np.float32)
        def run(lay):
            lay.zero_grad(); y, _ = lay.forward(x); lay.backward(dy)
            lay.eval(); z, _ = lay(x); lay.train()
            return y, z, {k: v.copy() for k, v in lay.grads.items()}
        want = [run(l) for l in lays]
        bad = []
        stop = threading.Event()
        def work(i):
            for _ in range(60):
                y, z, g = run(lays[i])
                if not (np.array_equal(y, want[i][0]) and np.array_equal(z, want[i][1])
                        and all(np.array_equal(g[k], want[i][2][k]) for k in g)):
                    bad.append(i)
        def release():
            while not stop.is_set():
                rc.release_memory()
        r = threading.Thread(target=release); r.start()
        ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in ts: t.start()
        for t in ts: t.join()
        stop.set(); r.join()
        print("BAD" if bad else "OK", len(bad))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "OK 0", out.stdout + out.stderr[-2000:]


TRIM_AFTER = 8


def test_a_one_off_large_call_is_trimmed_after_smaller_ones(threads):
    threads(1)   # no layer pipeline: the small calls use the big one's buffers (pool_y)
    rc.release_memory()
    lay = rc.LSTM(16, 64, num_layers=2, seed=6)
    lay.eval()
    big, small = _x(400, 200, 16), _x(10, 2, 16)
    want_small, _ = lay(small)
    lay(big)
    kept_big = rc.kept_memory()
    assert kept_big > 400 * 200 * 64 * 4          # the first layer's output at least
    for _ in range(TRIM_AFTER - 1):
        y, _ = lay(small)
    assert rc.kept_memory() == kept_big           # not yet
    y, _ = lay(small)
    assert rc.kept_memory() < kept_big / 100     # trimmed to the small call's sizes
    np.testing.assert_array_equal(y, want_small)
    y, _ = lay(small)                             # and kept at those
    np.testing.assert_array_equal(y, want_small)
    # calls that alternate between sizes keep the larger one
    lay(big)
    for _ in range(2 * TRIM_AFTER):
        lay(small)
        lay(big)
    assert rc.kept_memory() >= kept_big


def test_buffers_of_a_path_the_calls_no_longer_take_are_trimmed(threads):
    """With two threads a large stack runs its layers at once (the layer pipeline, whose
    outputs are kept in buffers of their own) and a small one in order: buffers the small calls
    never touch count as unused, so a one-off large call's are freed after TRIM_AFTER small
    ones too (before, they were kept until release_memory())."""
    from rnncore import _core
    threads(2)
    rc.release_memory()
    lay = rc.LSTM(16, 64, num_layers=2, seed=6)
    lay.eval()
    big, small = _x(400, 200, 16), _x(10, 2, 16)
    want_small, _ = lay(small)
    runs = _core.layer_pipeline_runs()
    lay(big)
    big_piped = _core.layer_pipeline_runs() - runs
    kept_big = rc.kept_memory()
    assert kept_big > 400 * 200 * 64 * 4          # the first layer's output at least
    runs = _core.layer_pipeline_runs()
    for _ in range(TRIM_AFTER - 1):
        y, _ = lay(small)
    assert (_core.layer_pipeline_runs() - runs > 0) != (big_piped > 0)   # the other path
    assert rc.kept_memory() == kept_big           # not yet
    y, _ = lay(small)
    assert rc.kept_memory() < kept_big / 100      # the big call's buffers freed
    np.testing.assert_array_equal(y, want_small)
    y, _ = lay(big[:, :3])                        # and a later call of the other path works
    np.testing.assert_allclose(y[:, :2], lay(big[:, :2])[0], rtol=1e-5, atol=1e-6)


def test_training_buffers_are_trimmed_too():
    rc.release_memory()
    lay = rc.GRU(16, 64, seed=7)
    big, small = _x(300, 200, 16), _x(10, 2, 16)
    lay.zero_grad()
    y, _ = lay.forward(small)
    lay.backward(np.ones_like(y))
    want = {k: v.copy() for k, v in lay.grads.items()}
    y, _ = lay.forward(big)
    lay.backward(np.ones_like(y))
    kept_big = rc.kept_memory()
    for _ in range(TRIM_AFTER):
        lay.zero_grad()
        y, _ = lay.forward(small)
        lay.backward(np.ones_like(y))
    assert rc.kept_memory() < kept_big / 50, (rc.kept_memory(), kept_big)
    for k, v in lay.grads.items():
        np.testing.assert_array_equal(v, want[k])
