"""Second-order RNNs, online learning (RTRL and truncated BPTT) and Hopfield networks."""
import numpy as np
import pytest

import rnncore as rc
from conftest import numeric_grad

# ---------------------------------------------------------------- second-order RNN


def so_reference(m, x, h0, lengths=None):
    p = {k: v.astype(np.float64) for k, v in m.params.items()}
    T, B, _ = x.shape
    h = np.zeros((B, m.hidden_size)) if h0 is None else h0.astype(np.float64).copy()
    lens = np.full(B, T) if lengths is None else np.asarray(lengths)
    ys = np.zeros((T, B, m.hidden_size))
    for t in range(T):
        if m.rank == 0:
            a = np.einsum("ijk,bj,bk->bi", p["weight"], h, x[t]) + p["bias"]
        else:
            f = (x[t] @ p["weight_fx"].T) * (h @ p["weight_fh"].T)
            a = f @ p["weight_hf"].T + x[t] @ p["weight_hx"].T + p["bias"]
        act = (t < lens)[:, None]
        h = np.where(act, np.tanh(a), h)
        ys[t] = np.where(act, h, 0)
    return ys, h


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rank", [None, 3])
def test_second_order_forward_matches_reference(rank, dtype):
    rng = np.random.default_rng(0)
    m = rc.SecondOrderRNN(4, 5, rank=rank, seed=0, dtype=dtype)
    x = rng.standard_normal((6, 3, 4)).astype(dtype)
    h0 = rng.standard_normal((3, 5)).astype(dtype)
    y, hn = m(x, h0, lengths=[6, 2, 4])
    yr, hr = so_reference(m, x, h0, [6, 2, 4])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, yr, atol=tol)
    np.testing.assert_allclose(hn, hr, atol=tol)
    ys, st = [], m.initial_state(3)
    st = h0
    for t in range(6):
        yt, st = m.step(x[t], st)
        ys.append(yt)
    np.testing.assert_allclose(np.stack(ys), so_reference(m, x, h0)[0], atol=tol)


@pytest.mark.parametrize("rank", [None, 2])
def test_second_order_gradients_finite_differences(rank):
    rng = np.random.default_rng(1)
    m = rc.SecondOrderRNN(3, 4, rank=rank, seed=1, dtype="float64")
    for k, v in m.params.items():
        m.params[k] = rng.uniform(-0.8, 0.8, v.shape)
    x = rng.standard_normal((5, 2, 3))
    h0 = rng.standard_normal((2, 4))
    lengths = [5, 3]
    y, hn = m.forward(x, h0, lengths)
    dy = rng.standard_normal(y.shape)
    dh = rng.standard_normal(hn.shape)
    m.zero_grad()
    dx, dh0 = m.backward(dy, dh)

    def loss():
        yy, hh = m(x, h0, lengths)
        return float((yy * dy).sum() + (hh * dh).sum())

    for k, v in m.params.items():
        np.testing.assert_allclose(m.grads[k], numeric_grad(v, loss), atol=1e-8, err_msg=k)
    np.testing.assert_allclose(dx, numeric_grad(x, loss), atol=1e-8)
    np.testing.assert_allclose(dh0, numeric_grad(h0, loss), atol=1e-8)


def tomita4(rng, n, max_len=12):
    """Tomita grammar 4: binary strings with no three consecutive zeros (balanced classes)."""
    X, Y, L = [], [], []
    while len(X) < n:
        l = int(rng.integers(1, max_len + 1))
        s = rng.integers(0, 2, l)
        label = int("000" not in "".join(map(str, s)))
        if sum(Y) > len(Y) / 2 and label == 1 or sum(Y) < len(Y) / 2 and label == 0:
            continue
        X.append(np.pad(s, (0, max_len - l)))
        Y.append(label)
        L.append(l)
    return np.array(X), np.array(Y), np.array(L)


@pytest.mark.parametrize("rank", [None, 8])
def test_second_order_learns_tomita4(rank):
    rng = np.random.default_rng(2)
    X, Y, L = tomita4(rng, 2000)
    Xt, Yt, Lt = tomita4(rng, 500)
    m = rc.Sequential(rc.OneHot(2), rc.SecondOrderRNN(2, 16, rank=rank, batch_first=True, seed=0),
                      rc.LastStep(), rc.Dense(16, 2, seed=0))
    m.fit(X, Y, lengths=L, optimizer=rc.optim.Adam(lr=0.02), epochs=12, batch_size=32, progress=False, seed=0)
    acc = m.evaluate(Xt, Yt, lengths=Lt)["accuracy"]
    assert acc > 0.9, acc


def test_second_order_in_a_saved_model(tmp_path):
    m = rc.Sequential(rc.SecondOrderRNN(3, 4, rank=2, batch_first=True), rc.LastStep(), rc.Dense(4, 2))
    m.save(tmp_path / "so.rnnc")
    m2 = rc.load(tmp_path / "so.rnnc")
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(m.predict(x), m2.predict(x))


# ---------------------------------------------------------------- online learning


@pytest.mark.parametrize("cell", ["rnn", "gru", "gru_orig", "lstm", "lstm_coupled"])
def test_rtrl_gradient_equals_bptt(cell):
    rng = np.random.default_rng(3)
    make = {"rnn": lambda: rc.RNN(2, 4, batch_first=True, dtype="float64", seed=1),
            "gru": lambda: rc.GRU(2, 4, batch_first=True, dtype="float64", seed=1),
            "gru_orig": lambda: rc.GRU(2, 4, batch_first=True, linear_before_reset=False, dtype="float64", seed=1),
            "lstm": lambda: rc.LSTM(2, 4, batch_first=True, dtype="float64", seed=1),
            "lstm_coupled": lambda: rc.LSTM(2, 4, batch_first=True, coupled_gates=True, dtype="float64", seed=1)}[cell]

    def model():
        return rc.Sequential(make(), rc.Dense(4, 3, activation="tanh", dtype="float64", seed=2),
                             rc.Dense(3, 1, dtype="float64", seed=3))

    T = 9
    X = rng.standard_normal((T, 2))
    Y = rng.standard_normal((T, 1))
    bptt = model()
    out, _ = bptt.forward(X[None])
    bptt.zero_grad()
    bptt.backward(2 * (out - Y[None]))                  # d/d out of sum_t (out_t - y_t)^2
    online = model()
    learner = rc.OnlineLearner(online, algorithm="rtrl", loss="mse")
    online.zero_grad()
    total = sum(learner.accumulate(X[t], Y[t]) for t in range(T))
    assert total == pytest.approx(float(((out - Y[None]) ** 2).sum()), rel=1e-12)
    for k, g in bptt.grads.items():
        scale = max(1.0, np.abs(g).max())
        err = np.abs(online.grads[k] - g).max() / scale
        assert err < 1e-8, (k, err)


def sine_stream(n):
    t = np.arange(n + 1) * 0.2
    return np.sin(t) * 0.8


@pytest.mark.parametrize("algorithm", ["rtrl", "tbptt"])
def test_online_sine_next_value(algorithm):
    s = sine_stream(3000)
    model = rc.Sequential(rc.GRU(1, 8, batch_first=True, dtype="float64", seed=0),
                          rc.Dense(8, 1, dtype="float64", seed=0))
    learner = rc.OnlineLearner(model, algorithm=algorithm, loss="mse",
                               optimizer=rc.optim.Adam(lr=0.01), truncation=10)
    losses = np.array([learner.step([s[i]], [s[i + 1]]) for i in range(3000)])
    first, last = losses[:200].mean(), losses[-200:].mean()
    assert last < first / 5, (first, last)
    assert learner.steps == 3000


def test_online_learner_refuses_bad_models_and_huge_rtrl():
    with pytest.raises(ValueError, match="single-layer"):
        rc.OnlineLearner(rc.Sequential(rc.LSTM(1, 4, num_layers=2), rc.Dense(4, 1)))
    with pytest.raises(ValueError, match="Dense"):
        rc.OnlineLearner(rc.Sequential(rc.GRU(1, 4), rc.LastStep()))
    with pytest.raises(ValueError, match="algorithm"):
        rc.OnlineLearner(rc.Sequential(rc.GRU(1, 4), rc.Dense(4, 1)), algorithm="ekf")
    with pytest.raises(ValueError, match="GiB"):
        rc.OnlineLearner(rc.Sequential(rc.LSTM(1, 512), rc.Dense(512, 1)), algorithm="rtrl")
    with pytest.raises(TypeError):
        rc.OnlineLearner(rc.GRU(1, 4))


# ---------------------------------------------------------------- Hopfield


def patterns(rng, p, n):
    return rng.choice([-1.0, 1.0], (p, n))


@pytest.mark.parametrize("rule", ["hebbian", "storkey"])
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_hopfield_recalls_below_capacity(rule, mode):
    rng = np.random.default_rng(4)
    n = 200
    P = patterns(rng, 10, n)                              # 0.05 n, well below 0.138 n
    h = rc.Hopfield(n).store(P, rule=rule)
    for i, p in enumerate(P):
        probe = p.copy()
        flip = rng.choice(n, n // 10, replace=False)
        probe[flip] *= -1
        out = h.recall(probe, mode=mode, seed=i)
        np.testing.assert_array_equal(out, p)
        assert h.last_converged


def test_hopfield_accepts_binary_patterns():
    rng = np.random.default_rng(5)
    P01 = rng.integers(0, 2, (3, 64))
    h = rc.Hopfield(64).store(P01)
    out = h.recall(P01[1])
    np.testing.assert_array_equal(out, 2 * P01[1] - 1)


def test_hopfield_async_energy_never_rises():
    rng = np.random.default_rng(6)
    for trial in range(20):
        n = int(rng.integers(10, 80))
        h = rc.Hopfield(n).store(patterns(rng, int(rng.integers(1, n)), n),
                                 rule="storkey" if trial % 2 else "hebbian")
        s = rng.choice([-1.0, 1.0], n)
        e = h.energy(s)
        for sweep in range(10):                       # one unit-order sweep at a time
            s = h.recall(s, mode="async", max_iter=1, seed=trial * 100 + sweep)
            e2 = h.energy(s)
            assert e2 <= e + 1e-9
            e = e2


def capacity(rule, n, rng, trials=3):
    """Largest number of random patterns all recalled exactly from 5%-corrupted probes."""
    best = 0
    for p in range(2, n):
        ok = True
        for _ in range(trials):
            P = patterns(rng, p, n)
            h = rc.Hopfield(n).store(P, rule=rule)
            for q in P:
                probe = q.copy()
                probe[rng.choice(n, n // 20, replace=False)] *= -1
                if not np.array_equal(h.recall(probe, seed=1), q):
                    ok = False
                    break
            if not ok:
                break
        if not ok:
            break
        best = p
    return best


def test_storkey_stores_more_than_hebbian():
    n = 64
    heb = capacity("hebbian", n, np.random.default_rng(7))
    sto = capacity("storkey", n, np.random.default_rng(7))
    assert sto > heb, (heb, sto)


def test_hopfield_errors():
    h = rc.Hopfield(8)
    with pytest.raises(ValueError, match=r"patterns: expected shape \(P, 8\)"):
        h.store(np.ones((2, 7)))
    with pytest.raises(ValueError, match="bipolar"):
        h.store(np.full((1, 8), 2.0))
    with pytest.raises(ValueError, match="rule"):
        h.store(np.ones((1, 8)), rule="oja")
    with pytest.raises(ValueError, match="mode"):
        h.recall(np.ones(8), mode="random")
    with pytest.raises(TypeError):
        h.recall(np.array(["a"] * 8))
    with pytest.raises(ValueError):
        rc.Hopfield(0)
