"""RNN, LSTM and GRU against PyTorch (the oracle) over a grid of configurations: outputs,
final states, input and initial-state gradients, every weight gradient; float32 and 64."""
import numpy as np
import pytest

import rnncore
from torch_oracle import compare_with_torch

CELLS = {
    "rnn_tanh": lambda *a, **k: rnncore.RNN(*a, nonlinearity="tanh", **k),
    "rnn_relu": lambda *a, **k: rnncore.RNN(*a, nonlinearity="relu", **k),
    "lstm": rnncore.LSTM,
    "gru": rnncore.GRU,
}
DTYPES = [np.float32, np.float64]


def make_x(layer, T, B, rng, unbatched=False):
    if unbatched:
        shape = (T, layer.input_size)
    else:
        shape = (B, T, layer.input_size) if layer.batch_first else (T, B, layer.input_size)
    return rng.standard_normal(shape).astype(layer.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", list(CELLS))
def test_grid(cell, num_layers, bidirectional, bias, batch_first, dtype):
    rng = np.random.default_rng(hash((cell, num_layers, bidirectional, bias, batch_first)) % 2**32)
    layer = CELLS[cell](4, 6, num_layers=num_layers, bias=bias, batch_first=batch_first,
                        bidirectional=bidirectional, seed=3, dtype=dtype)
    compare_with_torch(layer, make_x(layer, 5, 3, rng), rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_lstm_projection(num_layers, bidirectional, dtype):
    rng = np.random.default_rng(num_layers * 2 + bidirectional)
    layer = rnncore.LSTM(5, 8, num_layers=num_layers, proj_size=3, bidirectional=bidirectional,
                         seed=1, dtype=dtype)
    compare_with_torch(layer, make_x(layer, 6, 2, rng), rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", list(CELLS) + ["lstm_proj"])
def test_unbatched(cell, bidirectional, dtype):
    rng = np.random.default_rng(7)
    if cell == "lstm_proj":
        layer = rnncore.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=bidirectional, dtype=dtype)
    else:
        layer = CELLS[cell](3, 5, num_layers=2, bidirectional=bidirectional, dtype=dtype)
    compare_with_torch(layer, make_x(layer, 7, 1, rng, unbatched=True), rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", list(CELLS))
def test_without_initial_state(cell, dtype):
    rng = np.random.default_rng(11)
    layer = CELLS[cell](3, 4, num_layers=2, bidirectional=True, dtype=dtype)
    compare_with_torch(layer, make_x(layer, 4, 2, rng), with_state=False, rng=rng)


# Odd sizes exercise the tails of the GEMM panels; the larger ones the threaded paths.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (3, 2, 8, 40), (40, 2, 16, 24), (20, 5, 33, 47), (12, 9, 64, 130)])
@pytest.mark.parametrize("cell", list(CELLS) + ["lstm_proj"])
def test_sizes_every_isa(cell, sizes, dtype, each_isa):
    T, B, I, H = sizes
    rng = np.random.default_rng(T * 1000 + H)
    if cell == "lstm_proj":
        layer = rnncore.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=max(1, H // 3),
                             seed=5, dtype=dtype) if H > 1 else rnncore.LSTM(I, H, seed=5, dtype=dtype)
    else:
        layer = CELLS[cell](I, H, num_layers=2, bidirectional=True, seed=5, dtype=dtype)
    compare_with_torch(layer, make_x(layer, T, B, rng), rng=rng)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_thread_counts(n_threads, threads):
    threads(n_threads)
    rng = np.random.default_rng(n_threads)
    for cell in CELLS:
        layer = CELLS[cell](48, 96, num_layers=2, bidirectional=True, seed=2)
        compare_with_torch(layer, make_x(layer, 10, 6, rng), rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", list(CELLS) + ["lstm_proj"])
def test_lengths_against_packed_sequences(cell, bidirectional, dtype):
    """PyTorch's pack_padded_sequence(enforce_sorted=False): unsorted lengths, both
    directions, several layers; padded outputs are zero and final states are taken at
    each sequence's own last step."""
    rng = np.random.default_rng(21)
    if cell == "lstm_proj":
        layer = rnncore.LSTM(4, 6, num_layers=3, proj_size=2, bidirectional=bidirectional, dtype=dtype)
    else:
        layer = CELLS[cell](4, 6, num_layers=3, bidirectional=bidirectional, dtype=dtype)
    x = make_x(layer, 7, 5, rng)
    lengths = np.array([3, 7, 1, 5, 7])
    compare_with_torch(layer, x, lengths=lengths, rng=rng)


@pytest.mark.parametrize("cell", list(CELLS))
def test_lengths_batch_first(cell):
    rng = np.random.default_rng(5)
    layer = CELLS[cell](4, 6, num_layers=2, bidirectional=True, batch_first=True, dtype=np.float64)
    x = make_x(layer, 6, 4, rng)
    compare_with_torch(layer, x, lengths=[2, 6, 4, 1], rng=rng)
