"""Recurrent layers: RNN, LSTM and GRU (PyTorch-compatible parameters and semantics).

The Python side only checks arguments and shapes; the C++ core runs every time step
(`rnncore._core.forward` / `backward`), with the GIL released.
"""
from __future__ import annotations

import math
import threading
from collections import namedtuple

import numpy as np

from . import _core, _random
from ._arrays import (Module, ParamDict, aligned_copy, as_float_array, as_lengths, canonical_dtype, check_bool,
                      check_int, check_prob, shape_str)

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _check_device(device):
    if device is None or device == "cpu":
        return "cpu"
    if device == "cuda":
        if not _core.cuda_built():
            raise RuntimeError(f"device='cuda': {_core.cuda_status()}")
        if not _core.cuda_available():
            raise RuntimeError(f"device='cuda': {_core.cuda_status()}")
        raise RuntimeError("device='cuda': this build has the CUDA runtime but the recurrent "
                           "layers run on the CPU only in this version")
    raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")


class _Recurrent(Module):
    """Shared machinery of RNN, LSTM and GRU. Shapes use T time, B batch, I input,
    H hidden, P = proj_size or H, D directions, L layers."""

    _is_lstm = False
    is_recurrent = True

    def __init__(self, cell, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, peephole=False,
                 coupled_gates=False, linear_before_reset=True, seed=None, dtype="float32",
                 device="cpu"):
        input_size = check_int(input_size, "input_size")
        hidden_size = check_int(hidden_size, "hidden_size")
        num_layers = check_int(num_layers, "num_layers")
        proj_size = check_int(proj_size, "proj_size", minimum=0)
        if proj_size >= hidden_size and proj_size > 0:
            raise ValueError(f"proj_size: expected less than hidden_size ({hidden_size}), got {proj_size}")
        self.bias = check_bool(bias, "bias")
        self.batch_first = check_bool(batch_first, "batch_first")
        self.dropout = check_prob(dropout, "dropout")
        self.bidirectional = check_bool(bidirectional, "bidirectional")
        self.dtype = canonical_dtype(dtype)
        self.device = _check_device(device)
        if seed is not None:
            seed = check_int(seed, "seed", minimum=0)
        self.seed = seed
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.proj_size = proj_size
        self._spec = _core.LayerSpec(
            cell, input_size, hidden_size, num_layers, proj_size, self.bias, self.bidirectional,
            check_bool(peephole, "peephole"), check_bool(coupled_gates, "coupled_gates"),
            check_bool(linear_before_reset, "linear_before_reset"))
        self._info = self._spec.param_info()
        n_params = sum(int(np.prod(shape)) for _, shape, *_ in self._info)
        if n_params > 2**31:
            raise ValueError(f"sizes: input_size={input_size}, hidden_size={hidden_size}, "
                             f"num_layers={num_layers} need {n_params} parameters; at most 2^31 are supported")
        ss = _random.seed_sequence(seed)
        init_rng, drop_seed = np.random.default_rng(ss.spawn(1)[0]), ss.spawn(1)[0]
        self._drop_rng = np.random.default_rng(drop_seed)
        self._drop_lock = threading.Lock()
        k = 1.0 / math.sqrt(hidden_size)
        self.params = ParamDict(
            {name: aligned_copy(init_rng.uniform(-k, k, shape), self.dtype)
             for name, shape, *_ in self._info}, self.dtype)
        self.grads = ParamDict({name: aligned_copy(np.zeros(shape, self.dtype))
                                for name, shape, *_ in self._info}, self.dtype)
        self.training = True
        self._ctx = None
        # The recurrent weights packed for the kernels, kept from call to call and checked
        # against a content hash of the weights at each call (so in-place edits are seen).
        self._packed = _core.PackedWeights()
        self._packed_bf16 = None             # the bfloat16 copies (inference_precision)
        self._precision = "float32"
        # the fast paths of `step` and of a plain call (holds the parameter arrays, which are
        # only ever updated in place)
        self._stepper = _core.Stepper(self._spec, self._param_list(), self.dtype == np.float64)

    # ------------------------------------------------------------------ structure
    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Features of each output step: D * (proj_size or hidden_size)."""
        return self.num_directions * (self.proj_size or self.hidden_size)

    @property
    def inference_precision(self) -> str:
        """Precision of the recurrent weights in inference: "float32" (the default) or
        "bfloat16". With "bfloat16", calling the layer and `step` round W_hh (and W_hr) to
        bfloat16 (nearest even) and stream them at half the bytes: at batch 1 a step is bound
        by reading W_hh, so this is up to twice as fast where W_hh does not fit in the cache.
        The input projection, the states and every sum stay float32, so the outputs are exactly
        those of float32 weights rounded to bfloat16 (relative error of each weight at most
        2^-9). Training (`forward`/`backward`) always uses the float32 weights. float32
        layers only."""
        return self._precision

    @inference_precision.setter
    def inference_precision(self, value):
        if value not in ("float32", "bfloat16"):
            raise ValueError(f"inference_precision: expected 'float32' or 'bfloat16', got {value!r}")
        if value == "bfloat16" and self.dtype != np.float32:
            raise ValueError(f"inference_precision: 'bfloat16' needs a float32 layer, this one is "
                             f"{self.dtype.name}")
        if value == "bfloat16" and self._packed_bf16 is None:
            self._packed_bf16 = _core.PackedWeights(trusted=self.is_frozen)
        elif value == "float32":
            self._packed_bf16 = None
        self._precision = value

    # ------------------------------------------------------------------ copying, pickling
    def __getstate__(self):
        """What copy.deepcopy and pickle keep: the configuration, parameters, gradients, mode
        and dropout generator. The core objects (layer spec, kept packed weights, stepper)
        are rebuilt by __setstate__, never shared between copies."""
        return {"config": self.config(), "seed": self.seed, "training": self.training,
                "params": {k: np.array(v) for k, v in self.params.items()},
                "grads": {k: np.array(v) for k, v in self.grads.items()},
                "drop_rng": self._drop_rng.bit_generator.state,
                "inference_precision": self._precision, "frozen": self.is_frozen}

    def __setstate__(self, state):
        type(self).__init__(self, seed=state["seed"], **state["config"])
        for k, v in state["params"].items():
            self.params[k] = v
        for k, v in state["grads"].items():
            self.grads[k] = v
        self.training = state["training"]
        self._drop_rng.bit_generator.state = state["drop_rng"]
        if state.get("frozen", False):
            self._freeze()
        self.inference_precision = state.get("inference_precision", "float32")

    def _freeze(self):
        super()._freeze()
        self._ctx = None
        # The weights can never change: the kept packed copies are checked by address only.
        self._packed = _core.PackedWeights(trusted=True)
        if self._packed_bf16 is not None:
            self._packed_bf16 = _core.PackedWeights(trusted=True)
        # its steps read a copy of the weights packed once for the fused step kernels (the C++
        # Model's): results agree with the original layer's step to rounding, not bit for bit
        self._stepper = _core.Stepper(self._spec, self._param_list(), self.dtype == np.float64,
                                      frozen=True)

    def _param_list(self):
        return list(self.params.values())

    def config(self) -> dict:
        """Constructor arguments that rebuild this layer (used by save/load)."""
        cfg = dict(input_size=self.input_size, hidden_size=self.hidden_size,
                   num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first,
                   dropout=self.dropout, bidirectional=self.bidirectional, dtype=self.dtype.name)
        cfg.update(self._extra_config())
        return cfg

    def _extra_config(self):
        return {}

    def save(self, path):
        """Writes this layer (weights + configuration) to a safetensors file, atomically."""
        from .io import save
        save(self, path)

    def parameters(self):
        return list(self.params.values())

    def load_state_dict(self, state_dict, strict: bool = True):
        """Loads parameters by PyTorch name. Shapes must match; with strict=True the names
        must match exactly. Nothing is written unless every entry is valid."""
        self._check_trainable("load_state_dict")
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict: expected a mapping of names to arrays, got {type(state_dict).__name__}")
        strict = check_bool(strict, "strict")
        given = list(state_dict.keys())
        missing = [k for k in self.params if k not in state_dict]
        unexpected = [k for k in given if k not in self.params]
        problems = []
        converted = {}
        for k in given:
            if k not in self.params:
                continue
            try:
                arr = as_float_array(state_dict[k], k, self.dtype)
            except TypeError as e:
                problems.append(str(e))
                continue
            want = self.params[k].shape
            if arr.shape != want:
                problems.append(f"{k}: expected shape {shape_str(want)}, got {shape_str(arr.shape)}")
            converted[k] = arr
        if strict and (missing or unexpected):
            if missing:
                problems.append(f"missing keys: {missing}")
            if unexpected:
                problems.append(f"unexpected keys: {unexpected}")
        if problems:
            raise ValueError("state_dict: " + "; ".join(problems))
        for k, arr in converted.items():
            self.params[k] = arr
        return IncompatibleKeys(missing, unexpected)

    def __repr__(self):
        extra = []
        if self.num_layers != 1:
            extra.append(f"num_layers={self.num_layers}")
        for name, default in (("bias", True), ("batch_first", False), ("bidirectional", False)):
            if getattr(self, name) != default:
                extra.append(f"{name}={getattr(self, name)}")
        if self.dropout:
            extra.append(f"dropout={self.dropout}")
        if self.proj_size:
            extra.append(f"proj_size={self.proj_size}")
        if self.dtype != np.float32:
            extra.append(f"dtype='{self.dtype.name}'")
        return f"{type(self).__name__}({', '.join([str(self.input_size), str(self.hidden_size)] + extra)})"

    # ------------------------------------------------------------------ inputs
    def _prepare(self, x, state, lengths):
        """Returns (x as (T, B, I), h0, c0, lengths, unbatched)."""
        x = as_float_array(x, "x", self.dtype)
        I = self.input_size
        if x.ndim == 2:
            unbatched = True
        elif x.ndim == 3:
            unbatched = False
        else:
            want = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ValueError(f"x: expected a 3-D {want} or 2-D (T, I) array with I = {I}, "
                             f"got shape {shape_str(x.shape)}")
        if x.shape[-1] != I:
            want = ("(B, T, %d)" if self.batch_first else "(T, B, %d)") % I if not unbatched else "(T, %d)" % I
            raise ValueError(f"x: expected shape {want} (input_size = {I}), got {shape_str(x.shape)}")
        if unbatched:
            x = x[:, None, :]
        elif self.batch_first:
            x = np.ascontiguousarray(x.transpose(1, 0, 2))
        T, B = x.shape[0], x.shape[1]
        if T < 1 or B < 1:
            raise ValueError(f"x: expected at least one time step and one sequence, got shape {shape_str(x.shape)}")
        h0, c0 = self._split_state(state, "state" if self._is_lstm else "h0")
        h0 = self._state_array(h0, "h0", B, self.proj_size or self.hidden_size, unbatched)
        c0 = self._state_array(c0, "c0", B, self.hidden_size, unbatched)
        lens = None if lengths is None else as_lengths(lengths, B, T)
        return x, h0, c0, lens, unbatched

    def _split_state(self, state, name):
        if state is None:
            return None, None
        if self._is_lstm:
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"{name}: expected a tuple (h0, c0) (either may be None), got {type(state).__name__}")
            return state[0], state[1]
        if isinstance(state, (tuple, list)) and len(state) == 1:
            state = state[0]
        return state, None

    def _state_array(self, s, name, B, width, unbatched):
        if s is None:
            return None
        s = as_float_array(s, name, self.dtype)
        LD = self.num_layers * self.num_directions
        want = (LD, width) if unbatched else (LD, B, width)
        if s.shape != want:
            raise ValueError(f"{name}: expected shape {shape_str(want)} (num_layers * num_directions, "
                             f"{'' if unbatched else 'batch, '}{'hidden' if name == 'c0' else 'output'} size), "
                             f"got {shape_str(s.shape)}")
        return s[:, None, :] if unbatched else s

    def _masks(self, T, B):
        if not self.training or self.dropout == 0.0 or self.num_layers == 1:
            return None
        p = self.dropout
        shape = (T, B, self.output_size)
        with self._drop_lock:
            draws = [self._drop_rng.random(shape) for _ in range(self.num_layers - 1)]
        if p >= 1.0:
            return [np.zeros(shape, self.dtype) for _ in draws]
        return [np.ascontiguousarray((d >= p) / (1.0 - p), dtype=self.dtype) for d in draws]

    def _outputs(self, y, hn, cn, unbatched):
        if unbatched:
            y = y[:, 0, :]
            hn = hn[:, 0, :]
            cn = cn[:, 0, :] if cn is not None else None
        elif self.batch_first:
            y = np.ascontiguousarray(y.transpose(1, 0, 2))
        return y, ((hn, cn) if self._is_lstm else hn)

    def _run(self, x, state, lengths, keep):
        x, h0, c0, lens, unbatched = self._prepare(x, state, lengths)
        masks = self._masks(x.shape[0], x.shape[1])
        packed, precision = self._packing(keep)
        y, hn, cn, ctx = _core.forward(self._spec, self._param_list(), x, h0, c0, lens, masks, keep,
                                       packed, precision)
        return self._outputs(y, hn, cn, unbatched), ctx, unbatched, x.shape

    def _packing(self, keep):
        """(kept packed weights, recurrent precision) of a core forward call."""
        if keep or self._precision == "float32":
            return self._packed, "float32"
        return self._packed_bf16, self._precision

    # ------------------------------------------------------------------ public calls
    def __call__(self, x, state=None, lengths=None):
        """Inference: returns (y, h_n) or, for LSTM, (y, (h_n, c_n)). Keeps nothing."""
        if lengths is None and (self.num_layers == 1 or not self.training or self.dropout == 0.0):
            # the fast path: arrays already in the layer's form go straight to the kernels
            # (the core returns None for anything that needs converting or refusing)
            packed, precision = self._packing(False)
            out = self._stepper.sequence(x, state, packed, precision != "float32", self.batch_first)
            if out is not None:
                return out
        out, _, _, _ = self._run(x, state, lengths, keep=False)
        return out

    def forward(self, x, state=None, lengths=None):
        """Like calling the layer, and keeps the activations for `backward`."""
        self._check_trainable("forward")
        out, ctx, unbatched, shape = self._run(x, state, lengths, keep=True)
        self._ctx = (ctx, unbatched, shape)
        return out

    def backward(self, dy, dstate=None, *, input_grad=True):
        """BPTT through the last `forward`. dy: the gradient of y (same shape; None for
        zeros); dstate: of the final state (same structure; None for zeros). Accumulates
        into `grads` and returns (dx, dstate0). input_grad=False skips the gradient of the
        input (dx is then None): what a training loop on data does not need (PyTorch's
        input without requires_grad), one GEMM of the backward's six saved."""
        self._check_trainable("backward")
        if self._ctx is None:
            raise ValueError("backward: expected a preceding forward() (call forward(x) first; "
                             "each forward can be backpropagated once)")
        ctx, unbatched, (T, B, I) = self._ctx
        P, H = self.proj_size or self.hidden_size, self.hidden_size
        LD = self.num_layers * self.num_directions
        if dy is not None:
            dy = as_float_array(dy, "dy", self.dtype)
            if unbatched:
                want = (T, self.output_size)
            elif self.batch_first:
                want = (B, T, self.output_size)
            else:
                want = (T, B, self.output_size)
            if dy.shape != want:
                raise ValueError(f"dy: expected shape {shape_str(want)} (the shape of y), got {shape_str(dy.shape)}")
            if unbatched:
                dy = dy[:, None, :]
            elif self.batch_first:
                dy = np.ascontiguousarray(dy.transpose(1, 0, 2))
        dh, dc = self._split_state(dstate, "dstate")

        def state_grad(s, name, width):
            if s is None:
                return None
            s = as_float_array(s, name, self.dtype)
            want = (LD, width) if unbatched else (LD, B, width)
            if s.shape != want:
                raise ValueError(f"{name}: expected shape {shape_str(want)} (the shape of the final state), "
                                 f"got {shape_str(s.shape)}")
            return s[:, None, :] if unbatched else s

        dh = state_grad(dh, "dstate" if not self._is_lstm else "dstate[0]", P)
        dc = state_grad(dc, "dstate[1]", H)
        self._ctx = None
        dx, dh0, dc0 = _core.backward(self._spec, self._param_list(), ctx, dy, dh, dc,
                                      list(self.grads.values()), bool(input_grad))
        if unbatched:
            dx, dh0 = (dx[:, 0, :] if dx is not None else None), dh0[:, 0, :]
            dc0 = dc0[:, 0, :] if dc0 is not None else None
        elif self.batch_first and dx is not None:
            dx = np.ascontiguousarray(dx.transpose(1, 0, 2))
        return dx, ((dh0, dc0) if self._is_lstm else dh0)

    # ------------------------------------------------------------------ streaming
    def initial_state(self, batch_size: int = 1):
        """Zero state for `step`: (L*D, B, P), and for LSTM a tuple with (L*D, B, H)."""
        batch_size = check_int(batch_size, "batch_size")
        LD = self.num_layers * self.num_directions
        h = np.zeros((LD, batch_size, self.proj_size or self.hidden_size), self.dtype)
        if self._is_lstm:
            return h, np.zeros((LD, batch_size, self.hidden_size), self.dtype)
        return h

    def step(self, x_t, state=None):
        """One time step: x_t (B, I) or (I,) -> (y_t, new_state).

        The fast path: when `state` is a state this layer returned (or arrays of the layer's
        dtype, C-contiguous, writeable, of the right shapes) and x_t is an array of the
        layer's dtype, the new state is written into those arrays in place and they are
        returned: no allocation but y_t. Pass a copy to keep an old state."""
        st = self._stepper
        if state is not None and (
                not self.training or self.dropout == 0.0 or self.num_layers == 1):
            r = st.step(x_t, state, self._packed_bf16 if self._precision == "bfloat16" else None)
            if r is not None:
                return r
        if self.bidirectional:
            raise ValueError("step: a bidirectional layer needs the whole sequence; call the layer instead")
        x_t = as_float_array(x_t, "x_t", self.dtype)
        if x_t.ndim not in (1, 2) or x_t.shape[-1] != self.input_size:
            raise ValueError(f"x_t: expected shape (B, {self.input_size}) or ({self.input_size},), "
                             f"got {shape_str(x_t.shape)}")
        unbatched = x_t.ndim == 1
        B = 1 if unbatched else x_t.shape[0]
        h, c = self._split_state(state, "state")
        squeeze = False
        if unbatched and h is not None and np.ndim(h) == 3:
            squeeze = True   # batched (L, 1, P) state with an unbatched x_t: keep the state's form
        xs = x_t[None, None, :] if unbatched else x_t[None]
        h = self._state_array(h, "state" if not self._is_lstm else "state[0]", B,
                              self.proj_size or self.hidden_size, unbatched and not squeeze)
        c = self._state_array(c, "state[1]", B, self.hidden_size, unbatched and not squeeze)
        y, hn, cn, _ = _core.forward(self._spec, self._param_list(), xs, h, c, None,
                                     self._masks(1, B), False, *self._packing(False))
        y = y[0, 0] if unbatched else y[0]
        if unbatched and not squeeze:
            hn = hn[:, 0, :]
            cn = cn[:, 0, :] if cn is not None else None
        return y, ((hn, cn) if self._is_lstm else hn)


class RNN(_Recurrent):
    """Elman RNN: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or relu."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, seed=None, dtype="float32",
                 device="cpu"):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        cell = _core.CellType.RNN_TANH if nonlinearity == "tanh" else _core.CellType.RNN_RELU
        super().__init__(cell, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, seed=seed, dtype=dtype, device=device)

    def __call__(self, x, h0=None, lengths=None):
        return super().__call__(x, h0, lengths)

    def _extra_config(self):
        return {"nonlinearity": self.nonlinearity}


class LSTM(_Recurrent):
    """LSTM with PyTorch's gates (i, f, g, o), optional projection (proj_size), peepholes
    (Gers & Schmidhuber: i, f see c_{t-1}, o sees c_t) and coupled input-forget gates (CIFG)."""

    _is_lstm = True

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, peephole=False,
                 coupled_gates=False, seed=None, dtype="float32", device="cpu"):
        self.peephole = check_bool(peephole, "peephole")
        self.coupled_gates = check_bool(coupled_gates, "coupled_gates")
        super().__init__(_core.CellType.LSTM, input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, proj_size, peephole, coupled_gates,
                         seed=seed, dtype=dtype, device=device)

    def __call__(self, x, hx=None, lengths=None):
        return super().__call__(x, hx, lengths)

    def _extra_config(self):
        return {"proj_size": self.proj_size, "peephole": self.peephole,
                "coupled_gates": self.coupled_gates}


class GRU(_Recurrent):
    """GRU (r, z, n). linear_before_reset=True is PyTorch's/cuDNN's form,
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); False is Cho et al.'s original,
    n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, linear_before_reset=True, seed=None,
                 dtype="float32", device="cpu"):
        self.linear_before_reset = check_bool(linear_before_reset, "linear_before_reset")
        super().__init__(_core.CellType.GRU, input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional,
                         linear_before_reset=linear_before_reset, seed=seed, dtype=dtype,
                         device=device)

    def __call__(self, x, h0=None, lengths=None):
        return super().__call__(x, h0, lengths)

    def _extra_config(self):
        return {"linear_before_reset": self.linear_before_reset}
