"""Non-recurrent blocks for `Sequential`: Embedding, OneHot, Dense, Dropout, LastStep.

Inside a Sequential, data is batch-first: tokens (B, T) or features (B, T, F); a block
after LastStep sees (B, F). Every block has `params`/`grads` (PyTorch names, possibly
empty), `forward` (keeps what `backward` needs), `backward` (returns the input gradient,
accumulates parameter gradients) and `__call__` (inference, keeps nothing).
"""
from __future__ import annotations

import math

import numpy as np

from . import _core, _random
from ._arrays import (Module, ParamDict, as_float_array, canonical_dtype, check_int, check_prob,
                      shape_str)

_ACTIVATIONS = (None, "tanh", "relu", "sigmoid")


class Block(Module):
    _cache = None

    def __init__(self):
        self.params = ParamDict({}, np.float32)
        self.grads = ParamDict({}, np.float32)

    def _need_cache(self):
        if self._cache is None:
            raise ValueError(f"{type(self).__name__}.backward: expected a preceding forward()")
        c, self._cache = self._cache, None
        return c

    def config(self) -> dict:
        raise NotImplementedError

    def __call__(self, x, lengths=None):
        return self._run(x, lengths, keep=False)

    def forward(self, x, lengths=None):
        self._check_trainable("forward")
        return self._run(x, lengths, keep=True)


def _token_ids(x, n):
    ids = np.asarray(x)
    if ids.dtype.kind not in "iu":
        if ids.dtype.kind == "f" and ids.size and np.all(ids == np.round(ids)):
            ids = ids.astype(np.int64)
        else:
            raise TypeError(f"x: expected integer token ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"x: expected token ids in [0, {n - 1}], got {bad}")
    return ids


def _init_params(shapes, bound, seed, dtype):
    rng = _random.rng(seed)
    return {k: np.ascontiguousarray(rng.uniform(-bound, bound, s), dtype=dtype) for k, s in shapes.items()}


class Embedding(Block):
    """Token ids (B, T) -> vectors (B, T, dim). weight: (num_embeddings, dim), N(0, 1)
    initialised as in PyTorch."""

    def __init__(self, num_embeddings, embedding_dim, seed=None, dtype="float32"):
        self.num_embeddings = check_int(num_embeddings, "num_embeddings")
        self.embedding_dim = check_int(embedding_dim, "embedding_dim")
        self.dtype = canonical_dtype(dtype)
        w = _random.rng(seed).standard_normal((self.num_embeddings, self.embedding_dim))
        self.params = ParamDict({"weight": np.ascontiguousarray(w, dtype=self.dtype)}, self.dtype)
        self.grads = ParamDict({"weight": np.zeros_like(self.params["weight"])}, self.dtype)

    def _run(self, x, lengths, keep):
        ids = _token_ids(x, self.num_embeddings)
        if keep:
            self._cache = ids
        return self.params["weight"][ids]

    def backward(self, dy):
        ids = self._need_cache()
        g = self.grads["weight"]
        dy = as_float_array(dy, "dy", self.dtype)
        if dy.shape != ids.shape + (self.embedding_dim,):
            raise ValueError(f"dy: expected shape {shape_str(ids.shape + (self.embedding_dim,))}, "
                             f"got {shape_str(dy.shape)}")
        # g[ids] += dy row by row (np.add.at's result, in one pass in C++)
        _core.scatter_add_rows(g, ids.reshape(-1), np.ascontiguousarray(dy).reshape(-1, self.embedding_dim))
        return None

    def config(self):
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "dtype": self.dtype.name}


class OneHot(Block):
    """Token ids (B, T) -> one-hot vectors (B, T, num_classes)."""

    def __init__(self, num_classes, dtype="float32"):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes")
        self.dtype = canonical_dtype(dtype)

    def _run(self, x, lengths, keep):
        ids = _token_ids(x, self.num_classes)
        out = np.zeros(ids.shape + (self.num_classes,), self.dtype)
        np.put_along_axis(out, ids[..., None], 1, axis=-1)
        if keep:
            self._cache = True
        return out

    def backward(self, dy):
        self._need_cache()
        return None

    def config(self):
        return {"num_classes": self.num_classes, "dtype": self.dtype.name}


class Dense(Block):
    """y = act(x @ weight.T + bias) over the last axis, so it applies to every step of a
    sequence. weight: (out, in), bias: (out,), PyTorch Linear's initialisation."""

    def __init__(self, in_features, out_features, bias=True, activation=None, seed=None,
                 dtype="float32"):
        self.in_features = check_int(in_features, "in_features")
        self.out_features = check_int(out_features, "out_features")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: expected one of {_ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.bias = bool(bias)
        self.dtype = canonical_dtype(dtype)
        shapes = {"weight": (self.out_features, self.in_features)}
        if self.bias:
            shapes["bias"] = (self.out_features,)
        self.params = ParamDict(_init_params(shapes, 1 / math.sqrt(self.in_features), seed, self.dtype),
                                self.dtype)
        self.grads = ParamDict({k: np.zeros_like(v) for k, v in self.params.items()}, self.dtype)

    def _run(self, x, lengths, keep):
        x = as_float_array(x, "x", self.dtype)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape (..., {self.in_features}), got {shape_str(x.shape)}")
        # rnncore's GEMM on its own threads, not NumPy's BLAS: OpenBLAS's idle threads spin for
        # a while after each call, on the cores the recurrent kernels run on next (an epoch of
        # `rnncore train` took twice as long with x @ W.T here; benchmarks/fit.py)
        y = _core.matmul(x.reshape(-1, self.in_features), self.params["weight"], False, True)
        y = y.reshape(x.shape[:-1] + (self.out_features,))
        if self.bias:
            y += self.params["bias"]
        if self.activation == "tanh":
            y = np.tanh(y)
        elif self.activation == "relu":
            y = np.maximum(y, 0)
        elif self.activation == "sigmoid":
            y = 1 / (1 + np.exp(-y))
        if keep:
            self._cache = (x, y)
        return y

    def backward(self, dy):
        x, y = self._need_cache()
        dy = as_float_array(dy, "dy", self.dtype)
        if dy.shape != y.shape:
            raise ValueError(f"dy: expected shape {shape_str(y.shape)}, got {shape_str(dy.shape)}")
        if self.activation == "tanh":
            dy = dy * (1 - y * y)
        elif self.activation == "relu":
            dy = dy * (y > 0)
        elif self.activation == "sigmoid":
            dy = dy * y * (1 - y)
        d2 = dy.reshape(-1, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        _core.matmul(d2, x2, True, False, out=self.grads["weight"], beta=1.0)   # += d2.T @ x2
        if self.bias:
            self.grads["bias"] += d2.sum(axis=0)
        return _core.matmul(d2, self.params["weight"]).reshape(x.shape)

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias, "activation": self.activation, "dtype": self.dtype.name}


class Dropout(Block):
    """Zeroes each element with probability p during training (scaling the rest by
    1/(1-p)); the identity in eval mode."""

    def __init__(self, p=0.5, seed=None):
        super().__init__()
        self.p = check_prob(p, "p")
        self._rng = _random.rng(seed)
        self.seed = seed

    def _run(self, x, lengths, keep):
        x = np.asarray(x)
        if not self.training or self.p == 0.0:
            if keep:
                self._cache = 1.0
            return x
        if self.p >= 1.0:
            mask = np.zeros(x.shape, x.dtype)
        else:
            mask = (self._rng.random(x.shape) >= self.p).astype(x.dtype) / (1 - self.p)
        if keep:
            self._cache = mask
        return x * mask

    def backward(self, dy):
        mask = self._need_cache()
        return dy * mask

    def config(self):
        return {"p": self.p}


class LastStep(Block):
    """Many-to-one: (B, T, F) -> (B, F), each sequence's last valid step (lengths[b] - 1,
    or T - 1 without lengths)."""

    def __init__(self):
        super().__init__()

    def _run(self, x, lengths, keep):
        x = np.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"x: expected a (B, T, F) sequence, got shape {shape_str(x.shape)}")
        B, T = x.shape[:2]
        idx = np.full(B, T - 1) if lengths is None else np.asarray(lengths) - 1
        y = x[np.arange(B), idx]
        if keep:
            self._cache = (x.shape, idx, x.dtype)
        return y

    def backward(self, dy):
        shape, idx, dtype = self._need_cache()
        dx = np.zeros(shape, dtype)
        dx[np.arange(shape[0]), idx] = dy
        return dx

    def config(self):
        return {}
