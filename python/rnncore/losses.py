"""Losses. Each returns the mean loss as a float, or (loss, gradient) with return_grad=True.

- cross_entropy(logits, targets, mask=None, ignore_index=None): softmax over the last axis,
  integer targets of the leading shape; positions where mask is 0/False or the target
  equals ignore_index do not count.
- mse(pred, target, mask=None): mean squared error over the counted elements.
- binary_cross_entropy(pred, target, from_logits=True, mask=None): pred are logits (or
  probabilities with from_logits=False), targets in [0, 1].
"""
from __future__ import annotations

import numpy as np

from . import _core
from ._arrays import shape_str


def _mask(mask, shape, dtype):
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"mask: expected shape {shape_str(shape)}, got {shape_str(m.shape)}")
    return m.astype(dtype)


def cross_entropy(logits, targets, mask=None, ignore_index=None, return_grad=False):
    z = np.asarray(logits)
    if z.dtype.kind != "f":
        z = z.astype(np.float32)
    t = np.asarray(targets)
    if t.dtype.kind not in "iu":
        raise TypeError(f"targets: expected integer class ids, got dtype {t.dtype}")
    if t.shape != z.shape[:-1]:
        raise ValueError(f"targets: expected shape {shape_str(z.shape[:-1])} (logits without the class "
                         f"axis), got {shape_str(t.shape)}")
    C = z.shape[-1]
    valid = np.ones(t.shape, z.dtype) if mask is None else _mask(mask, t.shape, z.dtype)
    if ignore_index is not None:
        valid = valid * (t != ignore_index)
    tc = np.where(valid > 0, t, 0)
    if tc.size and (tc.min() < 0 or tc.max() >= C):
        bad = int(tc.min()) if tc.min() < 0 else int(tc.max())
        raise ValueError(f"targets: expected class ids in [0, {C - 1}], got {bad}")
    count = max(float(valid.sum()), 1.0)
    if z.dtype in (np.float32, np.float64) and C > 0:
        # one pass a row in C++ (max, exp, sum, log, the scaled gradient): NumPy took ten
        w = (valid / count).astype(z.dtype).reshape(-1)
        total, g = _core.softmax_xent(z.reshape(-1, C), tc.reshape(-1), w)
        loss = float(total)
        return (loss, g.reshape(z.shape)) if return_grad else loss
    zmax = z.max(axis=-1, keepdims=True)
    e = np.exp(z - zmax)
    s = e.sum(axis=-1, keepdims=True)
    logp = np.take_along_axis(z - zmax, tc[..., None], axis=-1)[..., 0] - np.log(s[..., 0])
    loss = float(-(logp * valid).sum() / count)
    if not return_grad:
        return loss
    g = e / s
    np.put_along_axis(g, tc[..., None], np.take_along_axis(g, tc[..., None], axis=-1) - 1, axis=-1)
    g *= (valid / count)[..., None]
    return loss, g.astype(z.dtype, copy=False)


def mse(pred, target, mask=None, return_grad=False):
    p = np.asarray(pred)
    t = np.asarray(target, dtype=p.dtype)
    if t.shape != p.shape:
        raise ValueError(f"target: expected shape {shape_str(p.shape)}, got {shape_str(t.shape)}")
    d = p - t
    m = _mask(mask, p.shape, p.dtype)
    if m is not None:
        d = d * m
    count = max(float(m.sum()) if m is not None else float(p.size), 1.0)
    loss = float((d * d).sum() / count)
    if not return_grad:
        return loss
    return loss, (2.0 / count) * d


def binary_cross_entropy(pred, target, from_logits=True, mask=None, return_grad=False):
    z = np.asarray(pred)
    t = np.asarray(target, dtype=z.dtype)
    if t.shape != z.shape:
        raise ValueError(f"target: expected shape {shape_str(z.shape)}, got {shape_str(t.shape)}")
    m = _mask(mask, z.shape, z.dtype)
    count = max(float(m.sum()) if m is not None else float(z.size), 1.0)
    if from_logits:
        l = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
        g = 1 / (1 + np.exp(-z)) - t
    else:
        eps = 1e-7 if z.dtype == np.float32 else 1e-12
        p = np.clip(z, eps, 1 - eps)
        l = -(t * np.log(p) + (1 - t) * np.log1p(-p))
        g = (p - t) / (p * (1 - p))
    if m is not None:
        l, g = l * m, g * m
    loss = float(l.sum() / count)
    if not return_grad:
        return loss
    return loss, g / count


_LOSSES = {"cross_entropy": cross_entropy, "mse": mse, "binary_cross_entropy": binary_cross_entropy}


def get(loss):
    """A loss by name (or the callable itself)."""
    if callable(loss):
        return loss
    if loss not in _LOSSES:
        raise ValueError(f"loss: expected one of {sorted(_LOSSES)} or a callable, got {loss!r}")
    return _LOSSES[loss]
