"""export_onnx: standard ONNX graphs (checked with onnx.checker) that ONNX Runtime runs with
rnncore's outputs, for every layer type, bidirectional, several layers and lengths."""
import numpy as np
import pytest

import rnncore as rc

ort = pytest.importorskip("onnxruntime")

LAYERS = {
    "rnn_tanh": lambda **k: rc.RNN(5, 6, **k),
    "rnn_relu": lambda **k: rc.RNN(5, 6, nonlinearity="relu", **k),
    "lstm": lambda **k: rc.LSTM(5, 6, **k),
    "lstm_peephole": lambda **k: rc.LSTM(5, 6, peephole=True, **k),
    "lstm_coupled": lambda **k: rc.LSTM(5, 6, coupled_gates=True, **k),
    "gru": lambda **k: rc.GRU(5, 6, **k),
    "gru_original": lambda **k: rc.GRU(5, 6, linear_before_reset=False, **k),
}


def session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_match_onnx_runtime(name, bidirectional, batch_first, tmp_path):
    rng = np.random.default_rng(0)
    layer = LAYERS[name](num_layers=2, bidirectional=bidirectional, batch_first=batch_first, seed=1)
    for k, v in layer.params.items():          # non-trivial peepholes and biases
        layer.params[k] = rng.uniform(-0.5, 0.5, v.shape)
    T, B = 7, 4
    x = rng.standard_normal((B, T, 5) if batch_first else (T, B, 5)).astype(np.float32)
    lengths = np.array([7, 3, 5, 1])
    path = tmp_path / "layer.onnx"
    rc.export_onnx(layer, path)
    sess = session(path)
    outs = sess.run(None, {"x": x, "lengths": lengths})
    y, st = layer(x, lengths=lengths)
    np.testing.assert_allclose(outs[0], y, atol=1e-5)
    if isinstance(layer, rc.LSTM):
        np.testing.assert_allclose(outs[1], st[0], atol=1e-5)
        np.testing.assert_allclose(outs[2], st[1], atol=1e-5)
    else:
        np.testing.assert_allclose(outs[1], st, atol=1e-5)


def test_bias_free_layer(tmp_path):
    layer = rc.GRU(3, 4, bias=False, seed=0)
    x = np.random.default_rng(1).standard_normal((6, 2, 3)).astype(np.float32)
    rc.export_onnx(layer, tmp_path / "g.onnx", with_lengths=False)
    out = session(tmp_path / "g.onnx").run(None, {"x": x})
    np.testing.assert_allclose(out[0], layer(x)[0], atol=1e-5)


def test_sequential_models_match(tmp_path):
    rng = np.random.default_rng(2)
    m = rc.Sequential(rc.Embedding(11, 8, seed=0), rc.LSTM(8, 16, batch_first=True, seed=1),
                      rc.Dropout(0.3), rc.Dense(16, 11, seed=2))
    m.eval()
    x = rng.integers(0, 11, (3, 9))
    rc.export_onnx(m, tmp_path / "lm.onnx", with_lengths=False)
    np.testing.assert_allclose(session(tmp_path / "lm.onnx").run(None, {"x": x})[0], m.predict(x), atol=1e-5)

    c = rc.Sequential(rc.OneHot(4), rc.GRU(4, 8, num_layers=2, bidirectional=True, batch_first=True, seed=0),
                      rc.LastStep(), rc.Dense(16, 8, activation="tanh", seed=1), rc.Dense(8, 3, seed=2))
    x = rng.integers(0, 4, (5, 6))
    lengths = np.array([6, 2, 4, 1, 5])
    rc.export_onnx(c, tmp_path / "clf.onnx")
    got = session(tmp_path / "clf.onnx").run(None, {"x": x, "lengths": lengths})[0]
    np.testing.assert_allclose(got, c.predict(x, lengths=lengths), atol=1e-5)


def test_unsupported_are_refused(tmp_path):
    with pytest.raises(ValueError, match="proj_size"):
        rc.export_onnx(rc.LSTM(3, 4, proj_size=2), tmp_path / "p.onnx")
    with pytest.raises(ValueError, match="SecondOrderRNN"):
        rc.export_onnx(rc.Sequential(rc.SecondOrderRNN(3, 4, batch_first=True), rc.Dense(4, 1)),
                       tmp_path / "s.onnx")
    with pytest.raises(TypeError):
        rc.export_onnx("model", tmp_path / "x.onnx")
