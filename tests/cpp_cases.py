"""Shared by the sanitizer and the portable-build tests: a CMake build of this project's
C++ targets, and the cases for tests/cpp/test_model.cpp written from Python (a model file,
its input and Python's predict and step outputs)."""
import subprocess
from pathlib import Path

import numpy as np

import rnncore as rc

ROOT = Path(__file__).resolve().parents[1]


def cmake_build(build_dir, targets, *defs, build_type="Release", allow_warnings=True):
    """Configures this project (no Python module) with the given -D definitions and builds
    the targets; asserts that both succeed and, unless allow_warnings, that no warning came."""
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DRNNCORE_BUILD_PYTHON=OFF",
                          f"-DCMAKE_BUILD_TYPE={build_type}", *defs], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    bld = subprocess.run(["cmake", "--build", str(build_dir), "--target", *targets, "-j", "2"],
                         capture_output=True, text=True)
    out = bld.stdout + bld.stderr
    assert bld.returncode == 0, out[-4000:]
    assert allow_warnings or "warning:" not in out, out[-4000:]


def write_case(folder, name, model, x):
    """x: time-major input; writes the model, input and Python's predict/step outputs, with
    float32 recurrent weights (NAME.predict, NAME.step) and bfloat16 ones (NAME.predict16,
    NAME.step16)."""
    model.save(folder / f"{name}.rnnc")
    model.eval()
    T, B = x.shape[:2]
    xb = x.transpose(1, 0, 2)
    tokens = isinstance(model.blocks[0], (rc.Embedding, rc.OneHot))
    for precision, sfx in (("float32", ""), ("bfloat16", "16")):
        model.inference_precision = precision
        y = model.predict(xb[..., 0].astype(np.int64) if tokens else xb)
        y = y if y.ndim == 2 else y.transpose(1, 0, 2)
        states, steps = None, []
        for t in range(T):
            o, states = model._run(xb[:, t:t + 1, 0].astype(np.int64) if tokens else xb[:, t:t + 1], None, states)
            steps.append(o if o.ndim == 2 else o[:, 0])
        np.asarray(y, "<f4").tofile(folder / f"{name}.predict{sfx}")
        np.asarray(np.stack(steps), "<f4").tofile(folder / f"{name}.step{sfx}")
    model.inference_precision = "float32"
    (folder / f"{name}.case").write_text(f"{T} {B}\n")
    x.astype("<f4").tofile(folder / f"{name}.x")


def write_cases(folder, large=False):
    """The models test_model runs (every cell and variant the C++ runner reads, token and
    float inputs), damaged copies it must refuse, and with large=True layers big enough
    for the packed, multi-threaded paths (several unit groups, bidirectional, B=9)."""
    rng = np.random.default_rng(0)
    write_case(folder, "lm", rc.Sequential(rc.Embedding(9, 6, seed=0),
                                           rc.LSTM(6, 12, num_layers=2, batch_first=True, peephole=True, seed=1),
                                           rc.Dense(12, 9, seed=2)),
               rng.integers(0, 9, (6, 3, 1)).astype(np.float32))
    write_case(folder, "clf", rc.Sequential(rc.OneHot(5), rc.GRU(5, 8, batch_first=True, linear_before_reset=False, seed=0),
                                            rc.LastStep(), rc.Dense(8, 3, activation="sigmoid", seed=1)),
               rng.integers(0, 5, (7, 2, 1)).astype(np.float32))
    write_case(folder, "reg", rc.Sequential(rc.LSTM(3, 10, proj_size=4, batch_first=True, seed=2),
                                            rc.RNN(4, 6, nonlinearity="relu", batch_first=True, seed=3),
                                            rc.Dense(6, 1, activation="tanh", seed=4)),
               rng.standard_normal((9, 4, 3)).astype(np.float32))
    good = (folder / "reg.rnnc").read_bytes()
    for i, cut in enumerate([0, 7, 8, 60, len(good) // 3, len(good) - 2]):
        (folder / f"bad_trunc{i}.rnnc").write_bytes(good[:cut])
    for i, pos in enumerate(sorted(set(rng.integers(0, len(good), 60).tolist()))):
        b = bytearray(good)
        b[pos] ^= 0xFF
        (folder / f"bad_flip{i}.rnnc").write_bytes(bytes(b))
    (folder / "bad_huge.rnnc").write_bytes((2**63).to_bytes(8, "little") + good[8:])
    if large:
        write_case(folder, "large", rc.Sequential(rc.LSTM(40, 96, batch_first=True, bidirectional=True, seed=5),
                                                  rc.GRU(192, 64, batch_first=True, seed=6),
                                                  rc.RNN(64, 48, batch_first=True, seed=7),
                                                  rc.Dense(48, 5, seed=8)),
                   rng.standard_normal((20, 9, 40)).astype(np.float32))
