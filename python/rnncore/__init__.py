"""rnncore: fast recurrent neural networks (RNN, LSTM, GRU) for the CPU.

A C++17 core (runtime-dispatched SIMD kernels, OpenMP threads) behind a thin Python layer
with PyTorch's parameter names, shapes and semantics.
"""
from __future__ import annotations

from . import _core, losses, optim
from ._core import get_num_threads
from ._random import manual_seed
from .blocks import Dense, Dropout, Embedding, LastStep, OneHot
from .cells import GRUCell, LSTMCell, RNNCell
from .classic import Hopfield, OnlineLearner, SecondOrderRNN
from .io import load
from .layers import GRU, LSTM, RNN
from .models import History, Seq2Seq, Sequential
from .onnx_export import export_onnx

__version__ = _core.version()

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "Sequential", "Seq2Seq",
           "Embedding", "OneHot", "Dense", "Dropout", "LastStep", "History", "losses", "optim",
           "load", "export_onnx", "Hopfield", "SecondOrderRNN", "OnlineLearner", "set_num_threads", "release_memory", "kept_memory", "get_cmake_dir", "get_include", "get_library", "get_num_threads", "info", "manual_seed", "__version__"]


def get_cmake_dir() -> str:
    """Folder of rnncore's CMake package: cmake -Drnncore_DIR=<this> + find_package(rnncore)."""
    import os
    return os.path.join(os.path.dirname(__file__), "share", "cmake", "rnncore")


def get_include() -> str:
    """Folder holding the C and C++ headers (rnncore/rnncore.h, rnncore/model.hpp, ...)."""
    import os
    return os.path.join(os.path.dirname(__file__), "include")


def get_library() -> str:
    """Path of the shared library with the C and C++ APIs (librnncore)."""
    import glob
    import os
    libdir = os.path.join(os.path.dirname(__file__), "lib")
    found = sorted(glob.glob(os.path.join(libdir, "librnncore.so*")) +
                   glob.glob(os.path.join(libdir, "librnncore*.dylib")) + glob.glob(os.path.join(libdir, "rnncore.dll")))
    if not found:
        raise FileNotFoundError(f"librnncore not found under {libdir}")
    return found[0]


def set_num_threads(n: int) -> None:
    """Threads used by rnncore's kernels (default: OMP_NUM_THREADS, else the core count)."""
    from ._arrays import check_int
    _core.set_num_threads(check_int(n, "n"))


def release_memory() -> None:
    """Frees the buffers rnncore keeps between calls so that repeated calls of a size fault in
    no new pages: inference's activations and outputs, the backward's gradient buffers and a
    spare training cache. (On their own they shrink to the last call's sizes after 8 calls in
    a row that used under a quarter of them, where they hold 16 MiB or more.) The calling
    thread's are freed now, every other thread's at the start of its next call; the next call
    allocates what it needs again. The weights' packed copies belong to the layers and go with
    them."""
    _core.release_memory()


def kept_memory() -> int:
    """Bytes of the buffers rnncore keeps between calls for the calling thread (see
    release_memory)."""
    return int(_core.kept_memory())


def info() -> dict:
    """Version, kernel ISA in use (and whether the float32 GEMMs use AMX), threads, and CUDA
    status."""
    import numpy as np
    return {
        "version": __version__,
        "isa": _core.isa(),
        "isa_detected": _core.detected_isa(),
        "isa_available": _core.available_isas(),
        "amx": _core.amx_status(),
        "threads": _core.get_num_threads(),
        "l2_cache_bytes": _core.l2_cache_bytes(),
        "openmp": _core.openmp_enabled(),
        "blas": "none: rnncore's own packed GEMM kernels",
        "cuda_built": _core.cuda_built(),
        "cuda": _core.cuda_status(),
        "numpy": np.__version__,
    }
