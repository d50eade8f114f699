"""Single-step cells with PyTorch's signatures: RNNCell, LSTMCell, GRUCell.

A cell is a one-layer, one-step view of the matching layer: its parameters (`weight_ih`,
`weight_hh`, `bias_ih`, `bias_hh`) are the very arrays of that layer, and the step runs in
the same C++ kernels.
"""
from __future__ import annotations

import numpy as np

from ._arrays import Module, ParamDict, as_float_array, shape_str, state_without
from .layers import GRU, LSTM, RNN


class _Cell(Module):
    _layer_cls = None
    _is_lstm = False

    def _setup(self, layer):
        self._layer = layer
        self.input_size, self.hidden_size = layer.input_size, layer.hidden_size
        self.bias, self.dtype = layer.bias, layer.dtype
        names = {k: k[: -len("_l0")] for k in layer.params}
        self._names = names
        self.params = ParamDict({names[k]: v for k, v in dict.items(layer.params)}, layer.dtype)
        self.grads = ParamDict({names[k]: v for k, v in dict.items(layer.grads)}, layer.dtype)
        self._ctx = None

    def __getstate__(self):
        return state_without(self, "params", "grads")   # views of the inner layer's arrays

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup(self._layer)
        self.params.frozen = self._layer.params.frozen

    def _freeze(self):
        self._layer._freeze()
        self._setup(self._layer)              # over the layer's immutable arrays
        self.params.frozen = True
        self.training = False

    def _wrap(self, x, state, name="x"):
        x = as_float_array(x, name, self.dtype)
        if x.ndim not in (1, 2) or x.shape[-1] != self.input_size:
            raise ValueError(f"{name}: expected shape (B, {self.input_size}) or ({self.input_size},), "
                             f"got {shape_str(x.shape)}")
        unbatched = x.ndim == 1
        B = 1 if unbatched else x.shape[0]
        xs = x[None, None, :] if unbatched else x[None]
        hs = self._state_in(state, B, unbatched)
        return xs, hs, unbatched

    def _state_in(self, state, B, unbatched):
        if state is None:
            return None
        parts = state if self._is_lstm else (state,)
        if self._is_lstm and (not isinstance(state, (tuple, list)) or len(state) != 2):
            raise TypeError(f"state: expected a tuple (h, c), got {type(state).__name__}")
        want = (self.hidden_size,) if unbatched else (B, self.hidden_size)
        out = []
        for i, s in enumerate(parts):
            name = "state" if not self._is_lstm else f"state[{i}]"
            if s is None:
                out.append(None)
                continue
            s = as_float_array(s, name, self.dtype)
            if s.shape != want:
                raise ValueError(f"{name}: expected shape {shape_str(want)}, got {shape_str(s.shape)}")
            out.append(s[None, None, :] if unbatched else s[None])
        return tuple(out) if self._is_lstm else out[0]

    def _state_out(self, st, unbatched):
        def one(a):
            return a[0, 0] if unbatched else a[0]
        if self._is_lstm:
            return one(st[0]), one(st[1])
        return one(st)

    def __call__(self, x, state=None):
        xs, hs, unbatched = self._wrap(x, state)
        _, st = self._layer(xs, hs)
        return self._state_out(st, unbatched)

    def forward(self, x, state=None):
        """Like calling the cell, and keeps what `backward` needs."""
        self._check_trainable("forward")
        xs, hs, unbatched = self._wrap(x, state)
        _, st = self._layer.forward(xs, hs)
        self._unbatched = unbatched
        return self._state_out(st, unbatched)

    def backward(self, dstate):
        """dstate: gradient of the returned state. Returns (dx, dstate_in); grads accumulate."""
        if self._layer._ctx is None:
            raise ValueError("backward: expected a preceding forward() of this cell")
        ub = self._unbatched
        B = self._layer._ctx[2][1]
        parts = self._state_in(dstate, B, ub) if dstate is not None else None
        dx, ds = self._layer.backward(None, parts)
        dx = dx[0, 0] if ub else dx[0]
        return dx, self._state_out(ds, ub)

    def load_state_dict(self, state_dict, strict=True):
        self._check_trainable("load_state_dict")
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict: expected a mapping, got {type(state_dict).__name__}")
        inv = {v: k for k, v in self._names.items()}
        mapped = {inv.get(k, k): v for k, v in state_dict.items()}
        res = self._layer.load_state_dict(mapped, strict)
        return type(res)([self._names.get(k, k) for k in res.missing_keys],
                         [k for k in state_dict if k not in inv])

    def __repr__(self):
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size})"


class RNNCell(_Cell):
    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", seed=None,
                 dtype="float32"):
        self.nonlinearity = nonlinearity
        self._setup(RNN(input_size, hidden_size, 1, nonlinearity, bias, seed=seed, dtype=dtype))


class LSTMCell(_Cell):
    _is_lstm = True

    def __init__(self, input_size, hidden_size, bias=True, seed=None, dtype="float32"):
        self._setup(LSTM(input_size, hidden_size, 1, bias, seed=seed, dtype=dtype))


class GRUCell(_Cell):
    def __init__(self, input_size, hidden_size, bias=True, seed=None, dtype="float32"):
        self._setup(GRU(input_size, hidden_size, 1, bias, seed=seed, dtype=dtype))
