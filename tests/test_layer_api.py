"""The layer contract beyond numerics: streaming, threads, strides, parameters and
state dicts, gradient accumulation, dropout, initialisation, cells, info."""
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import rnncore
from conftest import assert_close
from torch_oracle import TORCH_DTYPE

LAYERS = {
    "rnn": lambda **k: rnncore.RNN(5, 8, **k),
    "lstm": lambda **k: rnncore.LSTM(5, 8, **k),
    "lstm_proj_peep": lambda **k: rnncore.LSTM(5, 8, proj_size=3, peephole=True, **k),
    "gru": lambda **k: rnncore.GRU(5, 8, **k),
    "gru_orig": lambda **k: rnncore.GRU(5, 8, linear_before_reset=False, **k),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(LAYERS))
def test_step_equals_sequence(name, dtype):
    rng = np.random.default_rng(0)
    layer = LAYERS[name](num_layers=2, dtype=dtype, seed=0)
    x = rng.standard_normal((9, 3, 5)).astype(dtype)
    y, st = layer(x)
    state = layer.initial_state(3)
    ys = []
    for t in range(9):
        yt, state = layer.step(x[t], state)
        ys.append(yt)
    assert_close(np.stack(ys), y, dtype, "y")
    if isinstance(st, tuple):
        assert_close(state[0], st[0], dtype, "h")
        assert_close(state[1], st[1], dtype, "c")
    else:
        assert_close(state, st, dtype, "h")
    # unbatched steps, state passed in both of its forms
    y1, _ = layer(x[:, 0])
    s_batched, s_unbatched = layer.initial_state(1), None
    for t in range(9):
        a, s_batched = layer.step(x[t, 0], s_batched)
        b, s_unbatched = layer.step(x[t, 0], s_unbatched)
        assert a.shape == b.shape == (layer.output_size,)
        assert_close(a, y1[t], dtype, "unbatched step")
        assert_close(b, y1[t], dtype, "unbatched step")
    h = s_batched[0] if isinstance(s_batched, tuple) else s_batched
    assert h.ndim == 3


def test_step_refuses_bidirectional():
    layer = rnncore.GRU(3, 4, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        layer.step(np.zeros(3))


def in_threads(work, n):
    """Runs work(0..n-1) in n threads at once; re-raises the first exception any raised."""
    errors = []

    def guarded(i):
        try:
            work(i)
        except Exception as e:  # pragma: no cover - re-raised below
            errors.append(e)

    ts = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("name", list(LAYERS))
def test_shared_layer_many_threads(name, threads):
    threads(2)
    rng = np.random.default_rng(1)
    layer = LAYERS[name](num_layers=2, bidirectional=name != "lstm_proj_peep", seed=1)
    layer.eval()
    xs = [rng.standard_normal((30, 4, 5)).astype(np.float32) for _ in range(8)]
    expected = [layer(x) for x in xs]
    results = [None] * 8

    def work(i):
        for _ in range(5):
            results[i] = layer(xs[i])

    in_threads(work, 8)
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_shared_large_layer_many_threads(cell, threads):
    """Eight Python threads use one layer at once, at sizes where each bidirectional call runs
    its two directions at once and each step splits its units over a team of its own."""
    threads(2)
    rng = np.random.default_rng(2)
    bi = getattr(rnncore, cell)(24, 96, bidirectional=True, seed=1)
    uni = getattr(rnncore, cell)(64, 160, seed=2)
    bi.eval()
    uni.eval()
    xs = [rng.standard_normal((20, 2, 24)).astype(np.float32) for _ in range(8)]
    us = [rng.standard_normal((6, 2, 64)).astype(np.float32) for _ in range(8)]
    want_bi = [bi(x)[0] for x in xs]
    want_uni = [uni(u)[0] for u in us]
    got_bi, got_uni = [None] * 8, [None] * 8

    def work(i):
        for _ in range(4):
            got_bi[i] = bi(xs[i])[0]
            st = uni.initial_state(2)
            ys = []
            for t in range(6):
                y, st = uni.step(us[i][t], st)
                ys.append(y.copy())
            got_uni[i] = np.stack(ys)

    in_threads(work, 8)
    for i in range(8):
        np.testing.assert_array_equal(got_bi[i], want_bi[i])
        np.testing.assert_allclose(got_uni[i], want_uni[i], rtol=1e-5, atol=1e-6)


def test_call_releases_the_gil():
    """A Python thread keeps running while another thread is inside a long layer call."""
    layer = rnncore.LSTM(64, 256, seed=0)
    x = np.random.default_rng(0).standard_normal((400, 8, 64)).astype(np.float32)
    done = threading.Event()
    ticks = [0]

    def spin():
        while not done.is_set():
            ticks[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    before = ticks[0]
    layer(x)
    during = ticks[0] - before
    done.set()
    t.join()
    assert during > 1000


@pytest.mark.parametrize("name", list(LAYERS))
def test_strided_inputs(name):
    rng = np.random.default_rng(2)
    layer = LAYERS[name](num_layers=2, bidirectional=True, dtype="float64")
    base = rng.standard_normal((12, 6, 10))
    views = {
        "every_other": base[::2, ::2, ::2],
        "negative": base[::-2, ::-2, ::-2],
        "transposed": np.ascontiguousarray(base[:6, :3, :5].transpose(1, 0, 2)).transpose(1, 0, 2),
        "fortran": np.asfortranarray(base[:6, :3, :5]),
    }
    h0 = rng.standard_normal((8, 12, layer.proj_size or 8))[::2, ::4][:, :3]
    for what, v in views.items():
        assert v.shape == (6, 3, 5), what
        state = (h0, None) if isinstance(layer, rnncore.LSTM) else h0
        y1, s1 = layer(v, state)
        y2, s2 = layer(np.ascontiguousarray(v), (np.ascontiguousarray(h0), None)
                       if isinstance(layer, rnncore.LSTM) else np.ascontiguousarray(h0))
        np.testing.assert_array_equal(y1, y2, err_msg=what)
    y, _ = layer.forward(views["negative"])
    dy = rng.standard_normal((12, 6, y.shape[-1]))[::-2, ::-2]
    dx1, _ = layer.backward(dy)
    layer.forward(views["negative"])
    dx2, _ = layer.backward(np.ascontiguousarray(dy))
    np.testing.assert_array_equal(dx1, dx2)


def test_array_likes_and_dtype_conversion():
    layer = rnncore.RNN(2, 3, dtype="float64", seed=0)
    x = np.arange(8).reshape(4, 1, 2)
    ref, _ = layer(x.astype(np.float64))
    for like in (x.tolist(), x.astype(np.int32), x.astype(np.uint8), x.astype(np.float16),
                 torch.from_numpy(x), x.astype(np.float32)):
        y, _ = layer(like)
        assert y.dtype == np.float64
        np.testing.assert_array_equal(y, ref)
    f32 = rnncore.RNN(2, 3, seed=0)
    np.testing.assert_array_equal(f32(torch.from_numpy(x).float().requires_grad_())[0],
                                  f32(x.astype(np.float32))[0])


def test_params_names_shapes_and_torch_roundtrip():
    layer = rnncore.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3, seed=0)
    t = torch.nn.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3)
    assert list(layer.params) == list(t.state_dict())
    for k, v in t.state_dict().items():
        assert layer.params[k].shape == tuple(v.shape)
    # torch -> rnncore
    layer.load_state_dict(t.state_dict())
    for k, v in t.state_dict().items():
        np.testing.assert_array_equal(layer.params[k], v.numpy())
    # rnncore -> torch
    layer2 = rnncore.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3, seed=9)
    t.load_state_dict({k: torch.from_numpy(v) for k, v in layer2.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((4, 2, 5)).astype(np.float32)
    assert_close(layer2(x)[0], t(torch.from_numpy(x))[0].detach().numpy(), np.float32, "y")


def test_peephole_params_and_variant_shapes():
    layer = rnncore.LSTM(3, 4, num_layers=2, bidirectional=True, peephole=True, coupled_gates=True)
    peep = [k for k in layer.params if "peep" in k]
    assert peep == ["weight_peep_l0", "weight_peep_l0_reverse", "weight_peep_l1", "weight_peep_l1_reverse"]
    assert all(layer.params[k].shape == (3, 4) for k in peep)
    plain = rnncore.LSTM(3, 4, num_layers=2, bidirectional=True)
    for k, v in plain.params.items():
        assert layer.params[k].shape == v.shape


def test_state_dict_returns_copies_and_strictness():
    layer = rnncore.GRU(3, 4, seed=0)
    sd = layer.state_dict()
    sd["weight_ih_l0"][:] = 123
    assert not np.any(layer.params["weight_ih_l0"] == 123)
    with pytest.raises(ValueError, match=r"missing keys: \['bias_hh_l0'\]"):
        layer.load_state_dict({k: v for k, v in sd.items() if k != "bias_hh_l0"})
    with pytest.raises(ValueError, match=r"unexpected keys: \['extra'\]"):
        layer.load_state_dict({**sd, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"weight_hh_l0: expected shape \(12, 4\), got \(4, 12\)"):
        layer.load_state_dict({**sd, "weight_hh_l0": np.zeros((4, 12))})
    # non-strict: names may differ, shapes may not; the result lists both
    before = layer.state_dict()
    res = layer.load_state_dict({"weight_ih_l0": np.ones((12, 3)), "extra": 1}, strict=False)
    assert res.missing_keys == ["weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    assert res.unexpected_keys == ["extra"]
    assert np.all(layer.params["weight_ih_l0"] == 1)
    np.testing.assert_array_equal(layer.params["weight_hh_l0"], before["weight_hh_l0"])
    # a failed load writes nothing
    with pytest.raises(ValueError):
        layer.load_state_dict({**sd, "weight_hh_l0": np.zeros((3, 3))})
    assert np.all(layer.params["weight_ih_l0"] == 1)


def test_param_assignment_is_checked_and_in_place():
    layer = rnncore.RNN(3, 4)
    arr = layer.params["weight_ih_l0"]
    layer.params["weight_ih_l0"] = np.ones((4, 3), dtype=np.float64)
    assert layer.params["weight_ih_l0"] is arr and np.all(arr == 1) and arr.dtype == np.float32
    with pytest.raises(ValueError, match=r"weight_ih_l0: expected shape \(4, 3\), got \(3, 4\)"):
        layer.params["weight_ih_l0"] = np.ones((3, 4))
    with pytest.raises(KeyError):
        layer.params["nope"] = np.ones(3)
    with pytest.raises(TypeError):
        del layer.params["weight_ih_l0"]


def test_gradients_accumulate_and_zero_grad():
    rng = np.random.default_rng(3)
    layer = rnncore.LSTM(3, 4, dtype="float64")
    x = rng.standard_normal((5, 2, 3))
    dy = rng.standard_normal((5, 2, 4))
    layer.forward(x)
    layer.backward(dy)
    g1 = {k: v.copy() for k, v in layer.grads.items()}
    layer.forward(x)
    layer.backward(dy)
    for k in g1:
        np.testing.assert_allclose(layer.grads[k], 2 * g1[k], rtol=1e-12)
    layer.zero_grad()
    assert all(np.all(v == 0) for v in layer.grads.values())


def test_backward_frees_activations():
    layer = rnncore.GRU(3, 4)
    y, _ = layer.forward(np.zeros((2, 1, 3)))
    layer.backward(np.ones_like(y))
    with pytest.raises(ValueError, match="forward"):
        layer.backward(np.ones_like(y))


def test_dropout_training_only_and_seeded():
    x = np.random.default_rng(0).standard_normal((6, 4, 5)).astype(np.float32)
    a = rnncore.LSTM(5, 16, num_layers=3, dropout=0.5, seed=7)
    b = rnncore.LSTM(5, 16, num_layers=3, dropout=0.5, seed=7)
    ya1, _ = a(x)
    ya2, _ = a(x)
    yb1, _ = b(x)
    np.testing.assert_array_equal(ya1, yb1)          # same seed, same masks
    assert not np.array_equal(ya1, ya2)              # fresh masks each call
    a.eval()
    e1, _ = a(x)
    e2, _ = a(x)
    np.testing.assert_array_equal(e1, e2)
    nodrop = rnncore.LSTM(5, 16, num_layers=3, seed=7)
    np.testing.assert_allclose(e1, nodrop(x)[0], rtol=1e-6)
    assert a.train() is a and a.training


def test_dropout_gradients_use_the_same_masks():
    """With dropout, backward must differentiate the very function forward computed."""
    rng = np.random.default_rng(4)
    layer = rnncore.GRU(3, 4, num_layers=2, dropout=0.4, dtype="float64", seed=1)
    x = rng.standard_normal((4, 2, 3))
    layer._drop_rng = np.random.default_rng(5)
    y, _ = layer.forward(x)
    dx, _ = layer.backward(np.ones_like(y))
    eps = 1e-6
    x2 = x.copy()
    x2[1, 0, 2] += eps
    layer._drop_rng = np.random.default_rng(5)
    yp, _ = layer(x2)
    x2[1, 0, 2] -= 2 * eps
    layer._drop_rng = np.random.default_rng(5)
    ym, _ = layer(x2)
    fd = (yp.sum() - ym.sum()) / (2 * eps)
    assert abs(fd - dx[1, 0, 2]) < 1e-7


def test_default_initialisation_and_seed():
    a = rnncore.LSTM(10, 100, seed=0)
    b = rnncore.LSTM(10, 100, seed=0)
    c = rnncore.LSTM(10, 100, seed=1)
    k = 1 / np.sqrt(100)
    for name, v in a.params.items():
        np.testing.assert_array_equal(v, b.params[name])
        assert not np.array_equal(v, c.params[name])
        assert v.min() >= -k and v.max() <= k
        assert v.std() == pytest.approx(k / np.sqrt(3), rel=0.1)
    assert a.params["weight_hh_l0"].dtype == np.float32
    assert rnncore.GRU(3, 4, dtype="float64").params["weight_hh_l0"].dtype == np.float64


CELLS = [(rnncore.RNNCell, torch.nn.RNNCell, {}), (rnncore.RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}),
         (rnncore.LSTMCell, torch.nn.LSTMCell, {}), (rnncore.GRUCell, torch.nn.GRUCell, {})]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("idx", range(len(CELLS)))
def test_cells_against_torch(idx, bias, dtype):
    ours_cls, torch_cls, kw = CELLS[idx]
    rng = np.random.default_rng(idx)
    cell = ours_cls(4, 6, bias=bias, dtype=dtype, seed=0, **kw)
    tc = torch_cls(4, 6, bias=bias, **kw).to(TORCH_DTYPE[np.dtype(dtype).type])
    assert set(cell.params) == set(tc.state_dict())
    tc.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in cell.state_dict().items()})
    lstm = ours_cls is rnncore.LSTMCell
    x = rng.standard_normal((3, 4)).astype(dtype)
    h = rng.standard_normal((3, 6)).astype(dtype)
    c = rng.standard_normal((3, 6)).astype(dtype)
    state = (h, c) if lstm else h
    out = cell.forward(x, state)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    ht = torch.from_numpy(h.copy()).requires_grad_()
    ct = torch.from_numpy(c.copy()).requires_grad_()
    tout = tc(xt, (ht, ct)) if lstm else tc(xt, ht)
    dh = rng.standard_normal((3, 6)).astype(dtype)
    dc = rng.standard_normal((3, 6)).astype(dtype)
    if lstm:
        assert_close(out[0], tout[0].detach().numpy(), dtype, "h")
        assert_close(out[1], tout[1].detach().numpy(), dtype, "c")
        dx, (dh0, dc0) = cell.backward((dh, dc))
        ((tout[0] * torch.from_numpy(dh)).sum() + (tout[1] * torch.from_numpy(dc)).sum()).backward()
        assert_close(dc0, ct.grad.numpy(), dtype, "dc")
    else:
        assert_close(out, tout.detach().numpy(), dtype, "h")
        dx, dh0 = cell.backward(dh)
        (tout * torch.from_numpy(dh)).sum().backward()
    assert_close(dx, xt.grad.numpy(), dtype, "dx")
    assert_close(dh0, ht.grad.numpy(), dtype, "dh")
    for k, p in tc.named_parameters():
        assert_close(cell.grads[k], p.grad.numpy(), dtype, k)
    # unbatched and stateless calls
    one = cell(x[0])
    many = cell(x)
    if lstm:
        assert_close(one[0], many[0][0], dtype, "unbatched")
    else:
        assert_close(one, many[0], dtype, "unbatched")


def test_cell_params_are_the_layer_arrays():
    cell = rnncore.GRUCell(3, 4)
    cell.params["weight_hh"] = np.zeros((12, 4))
    assert np.all(cell._layer.params["weight_hh_l0"] == 0)
    cell.load_state_dict({k: np.ones_like(v) for k, v in cell.params.items()})
    assert np.all(cell._layer.params["bias_ih_l0"] == 1)


def test_isa_switch_and_threads_api():
    isas = rnncore._core.available_isas().split(",")
    assert rnncore.info()["isa"] in isas
    with pytest.raises(ValueError, match="isa"):
        rnncore._core.set_isa("sse9")
    with pytest.raises(ValueError):
        rnncore.set_num_threads(0)
    with pytest.raises(TypeError):
        rnncore.set_num_threads(1.5)


def test_isa_env_override():
    code = "import rnncore; print(rnncore.info()['isa'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "RNNCORE_ISA": "generic"})
    assert out.stdout.strip() in ("generic", "neon")


def test_info_command():
    for cmd in ([sys.executable, "-m", "rnncore", "info"], ["rnncore", "info"]):
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        for key in ("version", "isa", "threads", "cuda"):
            assert key in out.stdout
        assert rnncore.__version__ in out.stdout


def test_cuda_device_says_why():
    # without CUDA built: says so; built, without a GPU: the runtime's reason; built, with a
    # GPU (checked on an H200 machine): that the layers run on the CPU in this version
    if not rnncore._core.cuda_built():
        why = "CUDA"
    elif not rnncore._core.cuda_available():
        why = "no usable GPU|no GPU found"
    else:
        why = "run on the CPU only"
    for make in (rnncore.LSTM, rnncore.GRU, rnncore.RNN):
        with pytest.raises(RuntimeError, match=f"device='cuda': .*({why})"):
            make(3, 4, device="cuda")
    with pytest.raises(ValueError, match="device: expected 'cpu' or 'cuda', got 'gpu'"):
        rnncore.GRU(3, 4, device="gpu")


@pytest.mark.parametrize("make", [
    lambda: rnncore.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2, seed=1),
    lambda: rnncore.LSTM(3, 6, peephole=True, coupled_gates=True, dtype="float64", seed=2),
    lambda: rnncore.GRU(3, 6, linear_before_reset=False, batch_first=True, seed=3),
    lambda: rnncore.RNN(3, 6, nonlinearity="relu", num_layers=2, dropout=0.5, seed=4),
])
def test_deepcopy_and_pickle_make_independent_equal_layers(make):
    """copy.deepcopy and pickle keep configuration, parameters, gradients and mode; the
    copy shares nothing with the original (kept packed weights included)."""
    import copy
    import pickle
    layer = make()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 3, 3)).astype(layer.dtype)   # T > 7: kept packed weights
    first = list(layer.params)[1]
    layer.params[first][0, 0] += 1.0                           # not the seed's weights any more
    for g in layer.grads.values():
        g[...] = rng.standard_normal(g.shape)
    layer.eval()
    y = layer(x)[0]
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(other) is type(layer) and other.config() == layer.config()
        assert other.training is False
        assert other._packed is not layer._packed and other.params is not layer.params
        for k in layer.params:
            np.testing.assert_array_equal(other.params[k], layer.params[k])
            np.testing.assert_array_equal(other.grads[k], layer.grads[k])
        np.testing.assert_array_equal(other(x)[0], y)
        for v in other.params.values():
            v[...] = 0.0                                       # the original is untouched
        np.testing.assert_array_equal(layer(x)[0], y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameters_start_on_a_cache_line(tmp_path, dtype):
    """Every recurrent layer's parameter and gradient arrays start on a 64-byte boundary (the
    kernels read weights where they lie: whole lines a vector), through everything that makes
    or copies them: a new layer of any size, frozen() (read-only, immutable memory), deepcopy,
    pickle, a saved and loaded model, a cell's views; load_state_dict and assignment copy
    into the same arrays."""
    import copy
    import pickle
    from rnncore._arrays import ALIGN, aligned_copy, immutable

    def lined(arrays, what):
        for k, v in arrays.items():
            assert v.ctypes.data % ALIGN == 0, (what, k, v.ctypes.data % ALIGN)
            assert v.flags.c_contiguous and v.dtype == dtype, (what, k)

    for make in (lambda: rnncore.LSTM(1024, 1024, dtype=dtype), lambda: rnncore.GRU(3, 5, dtype=dtype),
                 lambda: rnncore.RNN(7, 1, num_layers=2, bidirectional=True, dtype=dtype),
                 lambda: rnncore.LSTM(5, 6, proj_size=3, peephole=True, dtype=dtype)):
        layer = make()
        lined(layer.params, "new")
        lined(layer.grads, "new grads")
        before = {k: v.ctypes.data for k, v in layer.params.items()}
        layer.load_state_dict({k: np.asarray(v) * 0.5 for k, v in layer.state_dict().items()})
        assert {k: v.ctypes.data for k, v in layer.params.items()} == before
        frozen = layer.frozen()
        lined(frozen.params, "frozen")
        assert not any(v.flags.writeable for v in frozen.params.values())
        lined(copy.deepcopy(layer).params, "deepcopy")
        lined(pickle.loads(pickle.dumps(layer)).params, "pickle")
        lined(pickle.loads(pickle.dumps(frozen)).params, "pickled frozen")
    cell = rnncore.LSTMCell(4, 8, dtype=dtype)
    lined(cell.params, "cell")
    if dtype == np.float32:
        path = str(tmp_path / "m.rnncore")
        rnncore.Sequential(rnncore.GRU(4, 8), rnncore.LSTM(8, 16)).save(path)
        loaded = rnncore.load(path)
        assert len(loaded.recurrent_layers) == 2
        for layer in loaded.recurrent_layers:
            lined(layer.params, "loaded")
            lined(layer.frozen().params, "loaded, frozen")
    # the helpers themselves, at every offset a NumPy allocation can take
    for n in (0, 1, 3, 17, 4096):
        a = np.arange(n, dtype=dtype)
        for b in (aligned_copy(a), immutable(a)):
            assert b.ctypes.data % ALIGN == 0 or n == 0
            assert np.array_equal(b, a) and b.dtype == a.dtype
