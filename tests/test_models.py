"""Sequential, the blocks, fit/predict/evaluate/generate and Seq2Seq: gradients are exact,
and each kind of model learns its task."""
import numpy as np
import pytest
import torch

import rnncore as rc
from conftest import numeric_grad


def fd_check_model(model, X, Y, lengths=None, loss="cross_entropy", eps=1e-6):
    lf = rc.losses.get(loss)
    out, _ = model.forward(X, lengths)
    _, g = lf(out, Y, return_grad=True)
    model.zero_grad()
    model.backward(g)
    worst = 0.0
    for k, p in model.params.items():
        g = numeric_grad(p, lambda: lf(model(X, lengths), Y), eps)
        worst = max(worst, float(np.abs(g - model.grads[k]).max()))
    return worst


def test_sequential_gradients_many_to_one():
    rng = np.random.default_rng(0)
    m = rc.Sequential(rc.Embedding(5, 3, seed=0, dtype="float64"),
                      rc.GRU(3, 4, batch_first=True, seed=0, dtype="float64"),
                      rc.LSTM(4, 3, seed=1, dtype="float64"),      # time-major inside a batch-first model
                      rc.LastStep(),
                      rc.Dense(3, 2, activation="tanh", seed=0, dtype="float64"),
                      rc.Dense(2, 3, dtype="float64"))
    X = rng.integers(0, 5, (4, 6))
    assert fd_check_model(m, X, rng.integers(0, 3, 4), lengths=np.array([6, 3, 2, 5])) < 1e-8


def test_sequential_gradients_many_to_many_regression():
    rng = np.random.default_rng(1)
    m = rc.Sequential(rc.RNN(2, 4, batch_first=True, dtype="float64", seed=0),
                      rc.Dense(4, 3, activation="sigmoid", dtype="float64", seed=1),
                      rc.Dense(3, 1, dtype="float64", seed=2))
    X = rng.standard_normal((3, 5, 2))
    assert fd_check_model(m, X, rng.standard_normal((3, 5, 1)), loss="mse") < 1e-8
    m2 = rc.Sequential(rc.OneHot(4, dtype="float64"), rc.LSTM(4, 3, batch_first=True, dtype="float64"),
                       rc.Dense(3, 1, activation="relu", dtype="float64"))
    Xi = rng.integers(0, 4, (3, 5))
    assert fd_check_model(m2, Xi, rng.random((3, 5, 1)), loss="binary_cross_entropy") < 1e-8


def test_dense_and_embedding_match_torch():
    rng = np.random.default_rng(2)
    d = rc.Dense(5, 3, seed=0, dtype="float64")
    lin = torch.nn.Linear(5, 3).double()
    lin.load_state_dict({k: torch.from_numpy(v) for k, v in d.params.items()})
    x = rng.standard_normal((2, 4, 5))
    y = d.forward(x)
    xt = torch.from_numpy(x).requires_grad_()
    yt = lin(xt)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx = d.backward(dy)
    (yt * torch.from_numpy(dy)).sum().backward()
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(d.grads["weight"], lin.weight.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(d.grads["bias"], lin.bias.grad.numpy(), rtol=1e-12)
    e = rc.Embedding(7, 3, seed=0, dtype="float64")
    emb = torch.nn.Embedding(7, 3).double()
    emb.load_state_dict({"weight": torch.from_numpy(e.params["weight"])})
    ids = rng.integers(0, 7, (3, 4))
    np.testing.assert_array_equal(e.forward(ids), emb(torch.from_numpy(ids)).detach().numpy())
    dy = rng.standard_normal((3, 4, 3))
    e.backward(dy)
    (emb(torch.from_numpy(ids)) * torch.from_numpy(dy)).sum().backward()
    np.testing.assert_allclose(e.grads["weight"], emb.weight.grad.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"token ids in \[0, 6\], got 7"):
        e(np.array([[7]]))


def test_dropout_block():
    d = rc.Dropout(0.5, seed=0)
    x = np.ones((100, 100), np.float32)
    y = d.forward(x)
    assert set(np.unique(y)) <= {0.0, 2.0} and 0.4 < (y == 0).mean() < 0.6
    np.testing.assert_array_equal(d.backward(np.ones_like(x)), y)
    d.eval()
    np.testing.assert_array_equal(d(x), x)


def test_last_step_honours_lengths():
    x = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    ls = rc.LastStep()
    y = ls.forward(x, np.array([2, 4]))
    np.testing.assert_array_equal(y, np.stack([x[0, 1], x[1, 3]]))
    dx = ls.backward(np.ones((2, 3)))
    assert dx[0, 1].sum() == 3 and dx[1, 3].sum() == 3 and dx.sum() == 6


def parity_data(rng, n=3000):
    """Bit strings of lengths 1..8 (bits as +-1) and their parity; half of the 8-bit
    strings are held out for testing."""
    all8 = (np.arange(256)[:, None] >> np.arange(8)[None, ::-1]) & 1
    held = rng.permutation(256)[:128]
    held_set = {tuple(r) for r in all8[held]}
    L = rng.integers(1, 9, n)
    B = rng.integers(0, 2, (n, 8))
    B[np.arange(8)[None, :] >= L[:, None]] = 0
    keep = np.array([not (l == 8 and tuple(b) in held_set) for b, l in zip(B, L)])
    B, L = B[keep], L[keep]
    X = (2 * B - 1).astype(np.float32)[..., None]
    Xt = (2 * all8[held] - 1).astype(np.float32)[..., None]
    return X, B.sum(1) % 2, L, Xt, all8[held].sum(1) % 2


def test_parity_many_to_one_learns():
    rng = np.random.default_rng(0)
    X, Y, L, Xt, Yt = parity_data(rng)
    m = rc.Sequential(rc.LSTM(1, 32, batch_first=True, seed=0), rc.LastStep(), rc.Dense(32, 2, seed=0))
    h = m.fit(X, Y, lengths=L, optimizer=rc.optim.Adam(lr=0.01), epochs=10, batch_size=32,
              progress=False, seed=0, validation_data=(Xt, Yt))
    assert set(h.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(h.history["loss"]) == 10
    acc = m.evaluate(Xt, Yt)["accuracy"]
    assert acc > 0.95, acc
    pred = m.predict(Xt).argmax(-1)
    assert (pred == Yt).mean() == pytest.approx(acc)


def test_noisy_sine_forecast_beats_naive():
    rng = np.random.default_rng(1)
    t = np.arange(40000) * 0.1
    s = np.sin(t) + 0.5 * np.sin(0.31 * t) + 0.1 * rng.standard_normal(t.size)
    T = 50
    n = (len(s) - 1) // T
    X = s[:n * T].reshape(n, T, 1).astype(np.float32)
    Y = s[1:n * T + 1].reshape(n, T, 1).astype(np.float32)
    Xtr, Ytr, Xte, Yte = X[:600], Y[:600], X[600:], Y[600:]
    m = rc.Sequential(rc.GRU(1, 32, batch_first=True, seed=0), rc.Dense(32, 1, seed=0))
    m.fit(Xtr, Ytr, loss="mse", optimizer=rc.optim.Adam(lr=0.01), epochs=15, batch_size=32,
          progress=False, seed=0)
    pred = m.predict(Xte)
    model_mse = float(((pred - Yte)[:, 5:] ** 2).mean())
    naive_mse = float(((Xte - Yte)[:, 5:] ** 2).mean())      # tomorrow = today
    assert model_mse < 0.6 * naive_mse, (model_mse, naive_mse)
    assert m.evaluate(Xte, Yte, loss="mse")["loss"] == pytest.approx(float(((pred - Yte) ** 2).mean()), rel=1e-4)


def test_truncated_bptt_carries_state_and_learns():
    # carrying the state across chunks gives the same forward pass as the whole sequence
    rng = np.random.default_rng(2)
    m = rc.Sequential(rc.Embedding(6, 4, seed=0), rc.LSTM(4, 8, batch_first=True, seed=0), rc.Dense(8, 6))
    X = rng.integers(0, 6, (3, 12))
    whole, _ = m.forward(X)
    a, st = m.forward(X[:, :5])
    b, _ = m.forward(X[:, 5:], states=st)
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), whole, rtol=1e-5, atol=1e-6)
    # a character model whose loss falls under bptt=16
    text = ("the quick brown fox jumps over the lazy dog; " * 80)
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text])
    Tn = 64
    n = (len(ids) - 1) // Tn
    Xc, Yc = ids[:n * Tn].reshape(n, Tn), ids[1:n * Tn + 1].reshape(n, Tn)
    lm = rc.Sequential(rc.Embedding(len(chars), 16, seed=0), rc.LSTM(16, 64, batch_first=True, seed=0),
                       rc.Dense(64, len(chars), seed=0))
    h = lm.fit(Xc, Yc, optimizer=rc.optim.Adam(lr=0.01), epochs=6, batch_size=8, bptt=16,
               progress=False, seed=0)
    losses = h.history["loss"]
    assert losses[-1] < 0.3 * losses[0], losses
    out = lm.generate(np.array([chars.index(c) for c in "the quick "]), 30, temperature=0)
    assert "".join(chars[i] for i in out).startswith("brown fox")


def test_generate_seeded_and_validated():
    m = rc.Sequential(rc.OneHot(5), rc.GRU(5, 8, batch_first=True, seed=0), rc.Dense(8, 5, seed=0))
    a = m.generate([1, 2], 20, temperature=1.0, seed=3)
    b = m.generate([1, 2], 20, temperature=1.0, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (20,) and a.min() >= 0 and a.max() < 5
    g = m.generate([1, 2], 10, temperature=0)
    np.testing.assert_array_equal(g, m.generate([1, 2], 10, temperature=0))
    with pytest.raises(ValueError, match="prime"):
        m.generate([], 5)
    with pytest.raises(ValueError, match="temperature"):
        m.generate([1], 5, temperature=-1)


def test_generate_draws_as_generator_choice():
    # each sampled id is the one Generator.choice(len(p), p=p) draws from the softmax of the
    # last output at that temperature, with the seeded generator (the whole sequence so far
    # run again each time as the reference, not the streaming state)
    m = rc.Sequential(rc.Embedding(7, 6, seed=1, dtype="float64"),
                      rc.LSTM(6, 12, batch_first=True, seed=2, dtype="float64"),
                      rc.Dense(12, 7, seed=3, dtype="float64"))
    got = m.generate([3, 1], 40, temperature=0.7, seed=11)
    rng = np.random.default_rng(11)
    seq = [3, 1]
    for _ in range(40):
        z = m.predict(np.array([seq]))[0, -1].astype(np.float64) / 0.7
        p = np.exp(z - z.max())
        p /= p.sum()
        seq.append(int(rng.choice(len(p), p=p)))
    np.testing.assert_array_equal(got, seq[2:])
    assert len(set(got.tolist())) > 2          # (it samples, not a constant)
    m.blocks[2].params["weight"][:] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        m.generate([3], 5, temperature=1.0, seed=0)


def test_fit_validates_inputs():
    m = rc.Sequential(rc.GRU(1, 4, batch_first=True), rc.LastStep(), rc.Dense(4, 2))
    with pytest.raises(ValueError, match="Y: expected 3 items"):
        m.fit(np.zeros((3, 5, 1)), np.zeros(2, int), progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        m.fit(np.zeros((3, 5, 1)), np.zeros(3, int), optimizer="nope", progress=False)
    with pytest.raises(TypeError, match="blocks\\[1\\]"):
        rc.Sequential(rc.GRU(1, 4), "dense")


def test_seq2seq_reverse_task():
    rng = np.random.default_rng(3)
    PAD, BOS, EOS, V, n, L = 0, 1, 2, 12, 4000, 6
    src = rng.integers(3, V, (n, L))
    tgt = np.concatenate([np.full((n, 1), BOS), src[:, ::-1], np.full((n, 1), EOS)], axis=1)
    model = rc.Seq2Seq(V, V, embed=32, hidden=128, cell="lstm", seed=0)
    h = model.fit(src[:3500], tgt[:3500], optimizer=rc.optim.Adam(lr=5e-3), epochs=8, batch_size=64,
                  progress=False, seed=0, validation_data=(src[3500:], tgt[3500:]))
    assert h.history["val_loss"][-1] < h.history["val_loss"][0]
    test = src[3500:3700]
    out = model.translate(test, max_len=L + 2, bos=BOS, eos=EOS)
    exact = np.mean([o == list(s[::-1]) for o, s in zip(out, test)])
    assert exact > 0.95, exact
    beam = model.translate(test[:30], max_len=L + 2, bos=BOS, eos=EOS, beam=3)
    assert np.mean([o == list(s[::-1]) for o, s in zip(beam, test[:30])]) > 0.9
    assert model.translate(test[0], max_len=L + 2, bos=BOS, eos=EOS) == out[0]
