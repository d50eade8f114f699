"""Optimizers with torch.optim's update rules, and gradient clipping.

An optimizer updates a dict of parameter arrays in place from a dict of gradients with
the same keys: `opt.step(params, grads)`. Its state (momenta, moments) is kept per key.
"""
from __future__ import annotations

import math

import numpy as np

from . import _core


def _touch(params):
    bump = getattr(params, "touch", None)
    if bump is not None:
        bump()


def clip_grad_norm(grads, max_norm):
    """Scales all gradients in place so that their global L2 norm is at most max_norm.
    Returns the norm before clipping."""
    arrays = list(grads.values()) if hasattr(grads, "values") else list(grads)
    # (not np.dot: NumPy's BLAS would wake threads that then spin on rnncore's cores)
    total = math.sqrt(_core.sum_squares([g if g.dtype in (np.float32, np.float64) else g.astype(np.float64)
                                         for g in map(np.asarray, arrays)]))
    if max_norm is not None and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in arrays:
            g *= scale
    return total


def clip_grad_value(grads, clip):
    """Clips every gradient element to [-clip, clip] in place."""
    arrays = list(grads.values()) if hasattr(grads, "values") else list(grads)
    for g in arrays:
        np.clip(g, -clip, clip, out=g)


class Optimizer:
    def __init__(self, lr):
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
        self.lr = float(lr)
        self.state = {}

    def step(self, params, grads):
        for k, p in params.items():
            g = grads[k]
            st = self.state.setdefault(k, {})
            self._update(p, np.asarray(g, dtype=p.dtype), st)
        _touch(params)

    def zero_state(self):
        self.state.clear()


class SGD(Optimizer):
    def __init__(self, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0):
        super().__init__(lr)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov: needs momentum > 0 and dampening = 0")
        self.momentum, self.nesterov = momentum, nesterov
        self.weight_decay, self.dampening = weight_decay, dampening

    def _update(self, p, g, st):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            if "buf" not in st:
                st["buf"] = g.copy()
            else:
                st["buf"] *= self.momentum
                st["buf"] += (1 - self.dampening) * g
            g = g + self.momentum * st["buf"] if self.nesterov else st["buf"]
        p -= self.lr * g


class Adam(Optimizer):
    decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(lr)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def _update(self, p, g, st):
        b1, b2 = self.betas
        if not st:
            st["t"] = 0
            st["m"] = np.zeros_like(p)
            st["v"] = np.zeros_like(p)
        st["t"] += 1
        t, m, v = st["t"], st["m"], st["v"]
        if (p.dtype in (np.float32, np.float64) and p.flags.c_contiguous and p.flags.writeable and
                all(a.dtype == p.dtype and a.shape == p.shape and a.flags.c_contiguous for a in (g, m, v))
                and m.flags.writeable and v.flags.writeable and not np.may_share_memory(p, g)):
            # one fused pass in C++ (the same rule and order of operations as below)
            _core.adam_update(p, g, m, v, self.lr, b1, b2, self.eps, self.weight_decay, self.decoupled, t)
            return
        if self.weight_decay:
            if self.decoupled:
                p *= 1 - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * p
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        bc1 = 1 - b1 ** t
        bc2 = 1 - b2 ** t
        denom = np.sqrt(v) / math.sqrt(bc2) + self.eps
        p -= (self.lr / bc1) * m / denom


class AdamW(Adam):
    decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(lr, betas, eps, weight_decay)


class RMSprop(Optimizer):
    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False):
        super().__init__(lr)
        self.alpha, self.eps, self.weight_decay = alpha, eps, weight_decay
        self.momentum, self.centered = momentum, centered

    def _update(self, p, g, st):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if not st:
            st["sq"] = np.zeros_like(p)
            if self.centered:
                st["avg"] = np.zeros_like(p)
            if self.momentum:
                st["buf"] = np.zeros_like(p)
        sq = st["sq"]
        sq *= self.alpha
        sq += (1 - self.alpha) * g * g
        if self.centered:
            st["avg"] *= self.alpha
            st["avg"] += (1 - self.alpha) * g
            avg = np.sqrt(sq - st["avg"] * st["avg"]) + self.eps
        else:
            avg = np.sqrt(sq) + self.eps
        if self.momentum:
            st["buf"] *= self.momentum
            st["buf"] += g / avg
            p -= self.lr * st["buf"]
        else:
            p -= self.lr * g / avg


class Adagrad(Optimizer):
    def __init__(self, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10):
        super().__init__(lr)
        self.lr_decay, self.weight_decay = lr_decay, weight_decay
        self.initial_accumulator_value, self.eps = initial_accumulator_value, eps

    def _update(self, p, g, st):
        if not st:
            st["t"] = 0
            st["sum"] = np.full_like(p, self.initial_accumulator_value)
        st["t"] += 1
        if self.weight_decay:
            g = g + self.weight_decay * p
        clr = self.lr / (1 + (st["t"] - 1) * self.lr_decay)
        st["sum"] += g * g
        p -= clr * g / (np.sqrt(st["sum"]) + self.eps)


def get(opt):
    if isinstance(opt, Optimizer):
        return opt
    if opt is None:
        return Adam(lr=2e-3)
    names = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop, "adagrad": Adagrad}
    if isinstance(opt, str) and opt.lower() in names:
        return names[opt.lower()]()
    raise ValueError(f"optimizer: expected an rnncore.optim optimizer or one of {sorted(names)}, got {opt!r}")
