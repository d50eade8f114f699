"""The classic recurrent algorithms: Hopfield networks, second-order RNNs and online
learning by real-time recurrent learning (RTRL) or truncated BPTT. The work runs in the
C++ core (rnncore._core)."""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from . import _core, _random
from . import losses as _losses
from . import optim as _optim
from ._arrays import (Module, ParamDict, as_float_array, as_lengths, canonical_dtype, check_bool,
                      check_int, shape_str)
from .blocks import Dense
from .layers import GRU, LSTM, RNN, _Recurrent

# ------------------------------------------------------------------------ Hopfield


class Hopfield:
    """A Hopfield network of n_units bipolar (+1/-1) units with symmetric weights and a zero
    diagonal. Patterns of 0/1 are accepted and converted to -1/+1.

    store(patterns, rule="hebbian" | "storkey") adds patterns (Storkey's rule stores more
    before recall breaks down); recall(probe, mode="async" | "sync", max_iter=100, seed=None)
    returns the state it settles in (async: one unit at a time in a seeded random order, so
    the energy never rises); energy(state) = -s^T W s / 2.
    """

    def __init__(self, n_units):
        self.n_units = check_int(n_units, "n_units")
        self.weights = np.zeros((self.n_units, self.n_units))
        self.last_iterations = 0
        self.last_converged = False

    def _bipolar(self, a, name, ndim):
        a = np.asarray(a)
        if a.dtype.kind not in "fiub":
            raise TypeError(f"{name}: expected numbers (+1/-1 or 0/1), got dtype {a.dtype}")
        if a.ndim == ndim - 1 and ndim == 2:
            a = a[None]
        if a.ndim != ndim or a.shape[-1] != self.n_units:
            want = f"(P, {self.n_units})" if ndim == 2 else f"({self.n_units},)"
            raise ValueError(f"{name}: expected shape {want}, got {shape_str(a.shape)}")
        a = a.astype(np.float64)
        vals = np.unique(a)
        if np.all(np.isin(vals, (0.0, 1.0))):
            a = 2.0 * a - 1.0
        elif not np.all(np.isin(vals, (-1.0, 1.0))):
            raise ValueError(f"{name}: expected bipolar (+1/-1) or binary (0/1) values, got {vals[:5]}")
        return np.ascontiguousarray(a)

    def store(self, patterns, rule="hebbian"):
        rules = {"hebbian": 0, "storkey": 1}
        if rule not in rules:
            raise ValueError(f"rule: expected 'hebbian' or 'storkey', got {rule!r}")
        p = self._bipolar(patterns, "patterns", 2)
        _core.hopfield_store(self.weights, p, rules[rule])
        return self

    def recall(self, probe, mode="async", max_iter=100, seed=None):
        modes = {"async": 0, "sync": 1}
        if mode not in modes:
            raise ValueError(f"mode: expected 'async' or 'sync', got {mode!r}")
        max_iter = check_int(max_iter, "max_iter")
        s = self._bipolar(probe, "probe", 1).copy()
        seed = int(_random.seed_sequence(seed).generate_state(1, np.uint64)[0])
        self.last_iterations, self.last_converged = _core.hopfield_recall(
            self.weights, s, modes[mode], max_iter, seed)
        return s

    def energy(self, state):
        return _core.hopfield_energy(self.weights, self._bipolar(state, "state", 1))


# ------------------------------------------------------------------------ second-order RNN


class SecondOrderRNN(Module):
    """Second-order recurrent units (Giles et al. 1992):
    h_t = tanh(sum_jk W[i, j, k] h_{t-1, j} x_{t, k} + b_i), weight (H, H, I), bias (H,);
    with rank=r the factored multiplicative RNN (Sutskever, Martens & Hinton 2011):
    f_t = (W_fx x_t) * (W_fh h_{t-1}), h_t = tanh(W_hf f_t + W_hx x_t + b).
    Same contract as the other layers: __call__, forward/backward (BPTT), initial_state/step,
    lengths, batch_first, float32/float64; usable in Sequential."""

    is_recurrent = True
    _is_lstm = False

    def __init__(self, input_size, hidden_size, rank=None, batch_first=False, seed=None,
                 dtype="float32"):
        self.input_size = check_int(input_size, "input_size")
        self.hidden_size = check_int(hidden_size, "hidden_size")
        self.rank = 0 if rank is None else check_int(rank, "rank")
        self.batch_first = check_bool(batch_first, "batch_first")
        self.dtype = canonical_dtype(dtype)
        self.seed = seed
        I, H, r = self.input_size, self.hidden_size, self.rank
        if r == 0 and H * H * I > 2**28:
            raise ValueError(f"sizes: the full second-order weight has H*H*I = {H * H * I} entries; "
                             "use rank=r for large layers")
        rng = _random.rng(seed)
        if r == 0:
            k = 1.0 / math.sqrt(H * I)
            shapes = {"weight": (H, H, I), "bias": (H,)}
            bounds = {"weight": k, "bias": 1.0 / math.sqrt(H)}
        else:
            shapes = {"weight_fx": (r, I), "weight_fh": (r, H), "weight_hf": (H, r),
                      "weight_hx": (H, I), "bias": (H,)}
            bounds = {"weight_fx": 1 / math.sqrt(I), "weight_fh": 1 / math.sqrt(H),
                      "weight_hf": 1 / math.sqrt(r), "weight_hx": 1 / math.sqrt(I), "bias": 1 / math.sqrt(H)}
        self.params = ParamDict({k: np.ascontiguousarray(rng.uniform(-bounds[k], bounds[k], s), dtype=self.dtype)
                                 for k, s in shapes.items()}, self.dtype)
        self.grads = ParamDict({k: np.zeros(s, self.dtype) for k, s in shapes.items()}, self.dtype)
        self.training = True
        self._ctx = None

    num_layers = 1
    num_directions = 1
    dropout = 0.0

    @property
    def output_size(self):
        return self.hidden_size

    def config(self):
        return {"input_size": self.input_size, "hidden_size": self.hidden_size,
                "rank": self.rank or None, "batch_first": self.batch_first, "dtype": self.dtype.name}

    def load_state_dict(self, state_dict, strict=True):
        self._check_trainable("load_state_dict")
        return _Recurrent.load_state_dict(self, state_dict, strict)

    def save(self, path):
        from .io import save
        save(self, path)

    def __repr__(self):
        return f"SecondOrderRNN({self.input_size}, {self.hidden_size}" + (f", rank={self.rank})" if self.rank else ")")

    def _prepare(self, x, h0, lengths):
        x = as_float_array(x, "x", self.dtype)
        I = self.input_size
        if x.ndim not in (2, 3) or x.shape[-1] != I:
            want = "(B, T, %d)" % I if self.batch_first else "(T, B, %d)" % I
            raise ValueError(f"x: expected shape {want} or (T, {I}), got {shape_str(x.shape)}")
        unbatched = x.ndim == 2
        if unbatched:
            x = x[:, None, :]
        elif self.batch_first:
            x = np.ascontiguousarray(x.transpose(1, 0, 2))
        T, B = x.shape[:2]
        if T < 1 or B < 1:
            raise ValueError(f"x: expected at least one step and one sequence, got {shape_str(x.shape)}")
        if isinstance(h0, (tuple, list)) and len(h0) == 1:
            h0 = h0[0]
        if h0 is not None:
            h0 = as_float_array(h0, "h0", self.dtype)
            want = (self.hidden_size,) if unbatched else (B, self.hidden_size)
            if h0.ndim == len(want) + 1 and h0.shape[0] == 1:      # (1, B, H) like the other layers
                h0 = h0[0]
            if h0.shape != want:
                raise ValueError(f"h0: expected shape {shape_str(want)}, got {shape_str(h0.shape)}")
            h0 = np.ascontiguousarray(h0.reshape(B, self.hidden_size))
        lens = None if lengths is None else as_lengths(lengths, B, T)
        return x, h0, lens, unbatched

    def _out(self, y, hn, unbatched):
        if unbatched:
            return y[:, 0, :], hn[0]
        if self.batch_first:
            y = np.ascontiguousarray(y.transpose(1, 0, 2))
        return y, hn

    def _run(self, x, h0, lengths, keep):
        x, h0, lens, unbatched = self._prepare(x, h0, lengths)
        y, hn, ctx = _core.second_order_forward(self.input_size, self.hidden_size, self.rank,
                                                list(self.params.values()), x, h0, lens, keep)
        return self._out(y, hn, unbatched), ctx, unbatched, x.shape

    def __call__(self, x, h0=None, lengths=None):
        out, _, _, _ = self._run(x, h0, lengths, False)
        return out

    def forward(self, x, h0=None, lengths=None):
        self._check_trainable("forward")
        out, ctx, unbatched, shape = self._run(x, h0, lengths, True)
        self._ctx = (ctx, unbatched, shape)
        return out

    def backward(self, dy, dstate=None, *, input_grad=True):
        """BPTT through the last `forward`: (dx, dstate0); dx is None where input_grad is
        False (its GEMMs skipped)."""
        if self._ctx is None:
            raise ValueError("backward: expected a preceding forward()")
        ctx, unbatched, (T, B, I) = self._ctx
        H = self.hidden_size
        if dy is not None:
            dy = as_float_array(dy, "dy", self.dtype)
            want = (T, H) if unbatched else ((B, T, H) if self.batch_first else (T, B, H))
            if dy.shape != want:
                raise ValueError(f"dy: expected shape {shape_str(want)}, got {shape_str(dy.shape)}")
            dy = dy[:, None, :] if unbatched else (np.ascontiguousarray(dy.transpose(1, 0, 2)) if self.batch_first else dy)
        if dstate is not None:
            dstate = as_float_array(dstate, "dstate", self.dtype)
            want = (H,) if unbatched else (B, H)
            if dstate.shape != want:
                raise ValueError(f"dstate: expected shape {shape_str(want)}, got {shape_str(dstate.shape)}")
            dstate = np.ascontiguousarray(dstate.reshape(B, H))
        self._ctx = None
        dx, dh0 = _core.second_order_backward(self.input_size, self.hidden_size, self.rank,
                                              list(self.params.values()), ctx, dy, dstate,
                                              list(self.grads.values()), bool(input_grad))
        if unbatched:
            return (dx[:, 0, :] if dx is not None else None), dh0[0]
        if self.batch_first and dx is not None:
            dx = np.ascontiguousarray(dx.transpose(1, 0, 2))
        return dx, dh0

    def initial_state(self, batch_size=1):
        return np.zeros((check_int(batch_size, "batch_size"), self.hidden_size), self.dtype)

    def step(self, x_t, state=None):
        x_t = as_float_array(x_t, "x_t", self.dtype)
        if x_t.ndim not in (1, 2) or x_t.shape[-1] != self.input_size:
            raise ValueError(f"x_t: expected shape (B, {self.input_size}) or ({self.input_size},), "
                             f"got {shape_str(x_t.shape)}")
        y, h = self(x_t[None], state)
        return y[0], h


# ------------------------------------------------------------------------ online learning


class OnlineLearner:
    """Continuous (online) learning that updates the weights at every step and never resets
    the state. The model is a Sequential of one single-layer, unidirectional RNN/GRU/LSTM
    (no projection or peepholes) followed by Dense blocks.

    algorithm="rtrl": real-time recurrent learning (Williams & Zipser 1989): the exact
    sensitivities of the state to every recurrent parameter are carried forward in C++.
    Cost per step O(S^2 n) multiply-adds and memory O(S n), S the state size (H, or 2H for
    LSTM) and n the recurrent parameter count (about G*H*(I+H)): O(H^4) time and O(H^3)
    memory, so for small H. algorithm="tbptt": backpropagation through the last
    `truncation` steps (a ring buffer of the inputs and the state at the window's start),
    O(truncation) per step.

    learner.step(x_t, y_t) -> the step's loss (before the update).
    """

    MAX_SENSITIVITY_BYTES = 2 * 1024**3

    def __init__(self, model, algorithm="rtrl", loss="mse", optimizer=None, truncation=20):
        from .models import Sequential
        if not isinstance(model, Sequential):
            raise TypeError(f"model: expected a Sequential, got {type(model).__name__}")
        rec, head = model.blocks[0], model.blocks[1:]
        if not isinstance(rec, (RNN, GRU, LSTM)) or rec.num_layers != 1 or rec.bidirectional \
                or rec.proj_size or getattr(rec, "peephole", False):
            raise ValueError("model: expected a single-layer, unidirectional RNN, GRU or LSTM "
                             "(no projection or peepholes) as the first block")
        if not head or not all(isinstance(b, Dense) for b in head):
            raise ValueError("model: expected Dense blocks after the recurrent layer")
        if algorithm not in ("rtrl", "tbptt"):
            raise ValueError(f"algorithm: expected 'rtrl' or 'tbptt', got {algorithm!r}")
        self.model, self.rec, self.head = model, rec, head
        self.algorithm = algorithm
        self.loss_fn = _losses.get(loss)
        self.optimizer = _optim.get(optimizer) if optimizer is not None else _optim.SGD(lr=0.01)
        self.truncation = check_int(truncation, "truncation")
        dt = rec.dtype
        H = rec.hidden_size
        self.h = np.zeros(H, dt)
        self.c = np.zeros(H, dt) if isinstance(rec, LSTM) else None
        if algorithm == "rtrl":
            S, n = _core.rtrl_sizes(rec._spec)
            need = S * n * dt.itemsize * 3
            if need > self.MAX_SENSITIVITY_BYTES:
                raise ValueError(f"algorithm='rtrl': the sensitivities of H={H} need {need / 2**30:.1f} GiB "
                                 f"(O(H^3)); use a smaller hidden_size or algorithm='tbptt'")
            self.P = np.zeros((S, n), dt)
        else:
            self._xs = deque(maxlen=self.truncation)
            self._start = (self.h.copy(), None if self.c is None else self.c.copy())
        self.steps = 0

    def _head_loss(self, h, y_t):
        out = h[None]
        for b in self.head:
            out = b.forward(out)
        if self.loss_fn is _losses.cross_entropy:
            target = np.asarray(y_t).reshape(1)
        else:
            target = np.asarray(y_t, dtype=out.dtype).reshape(out.shape)
        loss, g = self.loss_fn(out, target, return_grad=True)
        for b in reversed(self.head):
            g = b.backward(g)
        return loss, g[0]

    def accumulate(self, x_t, y_t):
        """Advances one step and adds this step's loss gradient to model.grads without
        updating the weights. Returns the step's loss."""
        rec = self.rec
        x = as_float_array(x_t, "x_t", rec.dtype).reshape(-1)
        if x.shape != (rec.input_size,):
            raise ValueError(f"x_t: expected shape ({rec.input_size},), got {shape_str(np.shape(x_t))}")
        params = list(rec.params.values())
        if self.algorithm == "rtrl":
            _core.rtrl_step(rec._spec, params, x, self.h, self.c, self.P)
            loss, dh = self._head_loss(self.h, y_t)
            dstate = dh if self.c is None else np.concatenate([dh, np.zeros_like(dh)])
            g = _core.matmul(dstate[None], self.P)[0]   # (dstate @ P without NumPy's BLAS threads)
            GH, I, H = rec._spec.gates * rec.hidden_size, rec.input_size, rec.hidden_size
            rec.grads["weight_ih_l0"] += g[:GH * I].reshape(GH, I)
            rec.grads["weight_hh_l0"] += g[GH * I:GH * (I + H)].reshape(GH, H)
            if rec.bias:
                rec.grads["bias_ih_l0"] += g[GH * (I + H):GH * (I + H) + GH]
                rec.grads["bias_hh_l0"] += g[GH * (I + H) + GH:]
        else:
            if len(self._xs) == self.truncation:       # slide the window: advance its start state
                h0, c0 = self._start
                st = (h0[None, None], c0[None, None]) if c0 is not None else h0[None, None]
                _, st = rec(self._xs[0][None, None], st)
                self._start = (st[0][0, 0].copy(), st[1][0, 0].copy()) if c0 is not None else (st[0, 0].copy(), None)
            self._xs.append(x.copy())
            h0, c0 = self._start
            xs = np.stack(self._xs)[None] if rec.batch_first else np.stack(self._xs)[:, None]
            st = (h0[None, None], c0[None, None]) if c0 is not None else h0[None, None]
            y, fin = rec.forward(xs, st)
            last = (0, -1) if rec.batch_first else (-1, 0)
            loss, dh = self._head_loss(y[last], y_t)
            dy = np.zeros_like(y)
            dy[last] = dh
            rec.backward(dy, input_grad=False)
            self.h = (fin[0] if isinstance(fin, tuple) else fin)[0, 0].copy()
            if self.c is not None:
                self.c = fin[1][0, 0].copy()
        self.steps += 1
        return float(loss)

    def step(self, x_t, y_t):
        """One online step: the loss of predicting y_t after x_t, then a weight update."""
        self.model.zero_grad()
        loss = self.accumulate(x_t, y_t)
        self.optimizer.step(self.model.params, self.model.grads)
        return loss
