"""The default source of randomness for everything created or drawn with seed=None (an extension
of the API, like `torch.manual_seed`): fresh entropy from the operating system unless
`manual_seed(n)` was called, after which every such object takes the next child of one
`numpy.random.SeedSequence(n)`, so that a program's weights, dropout masks, shuffles and samples
repeat from run to run. An explicit seed is used as given, whatever manual_seed says."""
from __future__ import annotations

import threading

import numpy as np

from ._arrays import check_int

_lock = threading.Lock()
_root = None   # the SeedSequence of manual_seed, or None: fresh entropy


def manual_seed(seed):
    """Seeds the default randomness of every later object or call that is given seed=None;
    manual_seed(None) goes back to fresh entropy. Returns the seed."""
    global _root
    with _lock:
        _root = None if seed is None else np.random.SeedSequence(check_int(seed, "seed", minimum=0))
    return seed


def seed_sequence(seed=None):
    """A SeedSequence: of `seed` where one is given, else the next child of manual_seed's (or
    fresh entropy)."""
    if seed is not None:
        return np.random.SeedSequence(seed)
    with _lock:
        return np.random.SeedSequence() if _root is None else _root.spawn(1)[0]


def rng(seed=None):
    """A numpy Generator: np.random.default_rng(seed) where a seed is given (the same stream as
    before manual_seed existed), else one from seed_sequence()."""
    return np.random.default_rng(seed if seed is not None else seed_sequence())
