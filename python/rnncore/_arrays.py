"""Argument checking and conversion shared by the Python layer.

Every public entry point converts its inputs here before calling the C++ core, so that a
bad argument raises a ValueError or TypeError that names the argument, what was expected
and what came, and the core only ever sees C-contiguous arrays of the layer's dtype.
"""
from __future__ import annotations

import ctypes
import numbers
import operator

import numpy as np

_DTYPES = {"float32": np.float32, "float64": np.float64}


def canonical_dtype(dtype) -> np.dtype:
    """The layer dtype from "float32"/"float64"/np.float32/np.float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype: expected 'float32' or 'float64', got {dtype!r}") from e
    if dt.name not in _DTYPES:
        raise TypeError(f"dtype: expected 'float32' or 'float64', got {dt.name}")
    return dt


def shape_str(shape) -> str:
    shape = tuple(shape)
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def as_float_array(x, name: str, dtype: np.dtype) -> np.ndarray:
    """Converts array-likes (lists, numpy arrays, CPU tensors) to a C-contiguous array of
    `dtype`. Real numbers (float, int, bool) are cast; complex, string and object data
    raise TypeError naming the argument and the dtype received."""
    if hasattr(x, "detach") and hasattr(x, "numpy"):   # a torch tensor that may need grad
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise TypeError(f"{name}: expected a numeric array, got {type(x).__name__} ({e})") from e
    if a.dtype.kind not in "fiub":
        raise TypeError(
            f"{name}: expected a real-valued array (float, int or bool), got dtype {a.dtype}")
    if a.dtype != dtype or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=dtype)
    return a


def as_lengths(lengths, batch: int, steps: int, name: str = "lengths") -> np.ndarray:
    if hasattr(lengths, "detach") and hasattr(lengths, "numpy"):
        lengths = lengths.detach().cpu().numpy()
    a = np.asarray(lengths)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and a.size and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise TypeError(f"{name}: expected integers, got dtype {a.dtype}")
    if a.shape != (batch,):
        raise ValueError(f"{name}: expected shape {shape_str((batch,))}, got {shape_str(a.shape)}")
    if a.size and (a.min() < 1 or a.max() > steps):
        bad = int(a.min()) if a.min() < 1 else int(a.max())
        raise ValueError(f"{name}: expected every length in [1, {steps}] (T = {steps}), got {bad}")
    return np.ascontiguousarray(a, dtype=np.int64)


def check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}") from None
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")


def check_prob(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number in [0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name}: expected a probability in [0, 1], got {value}")
    return value


def state_without(obj, *names) -> dict:
    """obj.__dict__ without the named attributes: for __getstate__ of an object whose named
    attributes are views of its parts' arrays, which its copy rebuilds over the copied parts
    (copied on their own they would be arrays that no part reads: a recurrent layer's copy
    makes new ones)."""
    return {k: v for k, v in obj.__dict__.items() if k not in names}


# Parameter arrays start on a 64-byte boundary (a cache line; NumPy's own allocations are
# 16-byte aligned, large ones at 16 bytes past a page): the kernels that read weights where
# they lie (the batch-1 products over slices beyond the L2, the input projection's rows of
# W_ih, the streaming step) then load whole lines, not two halves of neighbouring lines a
# vector.
ALIGN = 64


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + ALIGN, np.uint8)
    off = (-buf.ctypes.data) % ALIGN
    return buf[off:off + n].view(dtype).reshape(shape)


def aligned_copy(a, dtype=None) -> np.ndarray:
    """A C-contiguous copy of `a` (as `dtype`) on an ALIGN-byte boundary."""
    a = np.asarray(a, dtype=dtype)
    out = aligned_empty(a.shape, a.dtype)
    np.copyto(out, a)
    return out


def immutable(a) -> np.ndarray:
    """A read-only copy of `a` over memory that no array can write (a bytes object's): its
    WRITEABLE flag cannot be set again, and no writeable view of it exists. Its data starts on
    an ALIGN-byte boundary: a new zero-filled bytes object ALIGN bytes longer is filled at the
    aligned offset before anything else can see it."""
    a = np.ascontiguousarray(a)
    n = a.nbytes
    b = bytes(n + ALIGN)
    base = np.frombuffer(b, np.uint8).ctypes.data
    off = (-base) % ALIGN
    if n:
        ctypes.memmove(base + off, a.ctypes.data, n)
    return np.frombuffer(b, dtype=a.dtype, count=a.size, offset=off).reshape(a.shape)


class ParamDict(dict):
    """An ordered dict of fixed arrays (parameters or gradients).

    Keys and shapes are fixed by the layer. Assigning to a key validates the value (shape,
    real dtype) and copies it into the existing array, so references held elsewhere (an
    optimizer, a cell view) stay valid and the core always sees contiguous arrays of the
    layer's dtype. Keys cannot be added or removed. Frozen (`frozen()` copies of layers and
    models), the arrays are immutable and assignment raises.
    """

    __slots__ = ("_dtype", "version", "frozen")

    def __init__(self, arrays, dtype, frozen=False):
        super().__init__(arrays)
        self._dtype = np.dtype(dtype)
        self.version = 0
        self.frozen = False
        if frozen:
            self._freeze()

    def _refuse_frozen(self, key):
        if self.frozen:
            raise ValueError(f"{key}: the parameters are frozen (an inference-only copy made by "
                             f"frozen()); change them in a trainable layer or model and freeze "
                             f"that again")

    def __setitem__(self, key, value):
        self._refuse_frozen(key)
        if key not in self:
            raise KeyError(f"{key!r}: not a parameter of this layer (expected one of {list(self)})")
        target = dict.__getitem__(self, key)
        arr = as_float_array(value, key, self._dtype)
        if arr.shape != target.shape:
            raise ValueError(f"{key}: expected shape {shape_str(target.shape)}, got {shape_str(arr.shape)}")
        np.copyto(target, arr)
        self.version += 1

    def touch(self):
        """Marks the arrays as changed in place (optimizers call this after an update)."""
        self._refuse_frozen("touch")
        self.version += 1

    def _freeze(self):
        """Replaces every array by an immutable copy (see `immutable`)."""
        for k, v in dict.items(self):
            dict.__setitem__(self, k, immutable(v))
        self.frozen = True
        self.version += 1

    def update(self, *args, **kwargs):
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def _refuse(self, *args, **kwargs):
        raise TypeError("the parameter set of a layer is fixed: keys cannot be added or removed")

    __delitem__ = pop = popitem = clear = setdefault = _refuse

    def __reduce__(self):
        # A ParamDict again (a plain dict would make assignment replace arrays instead of
        # copying into them); frozen stays frozen.
        return (ParamDict, (dict(self), self._dtype, self.frozen))


class Module:
    """What every layer and block shares: training mode, gradients, state dicts. Subclasses
    set `params` and `grads` (ParamDicts)."""

    training = True

    def train(self, mode=True):
        mode = check_bool(mode, "mode")
        if mode:
            self._check_trainable("train")
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for g in self.grads.values():
            g.fill(0)

    def state_dict(self):
        return {k: v.copy() for k, v in self.params.items()}

    @property
    def is_frozen(self) -> bool:
        """Whether this is a frozen, inference-only copy (see `frozen()`)."""
        return bool(getattr(self.params, "frozen", False))

    def frozen(self):
        """An inference-only copy whose parameters can never change (immutable read-only
        arrays): calling it, `step` and saving work; training, assignment and
        load_state_dict raise ValueError. A recurrent layer's copy keeps its packed
        recurrent weights without checking them at each call (the check reads W_hh and, for
        short inputs, W_ih: 10-20% of a batch-1 call at H=1024). The original is unchanged."""
        import copy
        c = copy.deepcopy(self)
        c._freeze()
        return c

    def _freeze(self):
        self.params._freeze()
        self.training = False

    def _check_trainable(self, what):
        if self.is_frozen:
            raise ValueError(f"{what}: this copy is frozen (inference only, made by frozen()); "
                             f"train the original, or load its state_dict into a new layer")
