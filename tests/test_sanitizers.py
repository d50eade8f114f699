"""The C++ model reader and runner under AddressSanitizer and UndefinedBehaviorSanitizer:
the core and tests/cpp/test_model.cpp are built from source with both sanitizers, then run
on models saved from Python (outputs compared with Python's) and on damaged files."""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import rnncore as rc

ROOT = Path(__file__).resolve().parents[1]


def sanitizer_build(tmp):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not available")
    b = tmp / "build-asan"
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(b), "-DRNNCORE_BUILD_TESTS=ON",
                          "-DRNNCORE_SANITIZE=ON", "-DRNNCORE_BUILD_PYTHON=OFF",
                          "-DCMAKE_BUILD_TYPE=RelWithDebInfo"], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    bld = subprocess.run(["cmake", "--build", str(b), "--target", "rnncore_cpp_tests", "-j", "2"],
                         capture_output=True, text=True)
    assert bld.returncode == 0, bld.stdout[-3000:] + bld.stderr[-3000:]
    return b / "rnncore_cpp_tests"


def write_case(folder, name, model, x):
    """x: time-major input; writes the model, input and Python's predict/step outputs."""
    model.save(folder / f"{name}.rnnc")
    model.eval()
    T, B = x.shape[:2]
    xb = x.transpose(1, 0, 2)
    tokens = isinstance(model.blocks[0], (rc.Embedding, rc.OneHot))
    y = model.predict(xb[..., 0].astype(np.int64) if tokens else xb)
    y = y if y.ndim == 2 else y.transpose(1, 0, 2)
    states, steps = None, []
    for t in range(T):
        o, states = model._run(xb[:, t:t + 1, 0].astype(np.int64) if tokens else xb[:, t:t + 1], None, states)
        steps.append(o if o.ndim == 2 else o[:, 0])
    (folder / f"{name}.case").write_text(f"{T} {B}\n")
    x.astype("<f4").tofile(folder / f"{name}.x")
    np.asarray(y, "<f4").tofile(folder / f"{name}.predict")
    np.asarray(np.stack(steps), "<f4").tofile(folder / f"{name}.step")


def test_cpp_model_under_sanitizers(tmp_path):
    exe = sanitizer_build(tmp_path)
    cases = tmp_path / "cases"
    cases.mkdir()
    rng = np.random.default_rng(0)
    write_case(cases, "lm", rc.Sequential(rc.Embedding(9, 6, seed=0), rc.LSTM(6, 12, num_layers=2, batch_first=True,
                                                                              peephole=True, seed=1),
                                          rc.Dense(12, 9, seed=2)),
               rng.integers(0, 9, (6, 3, 1)).astype(np.float32))
    write_case(cases, "clf", rc.Sequential(rc.OneHot(5), rc.GRU(5, 8, batch_first=True, linear_before_reset=False, seed=0),
                                           rc.LastStep(), rc.Dense(8, 3, activation="sigmoid", seed=1)),
               rng.integers(0, 5, (7, 2, 1)).astype(np.float32))
    write_case(cases, "reg", rc.Sequential(rc.LSTM(3, 10, proj_size=4, batch_first=True, seed=2),
                                           rc.RNN(4, 6, nonlinearity="relu", batch_first=True, seed=3),
                                           rc.Dense(6, 1, activation="tanh", seed=4)),
               rng.standard_normal((9, 4, 3)).astype(np.float32))
    good = (cases / "reg.rnnc").read_bytes()
    for i, cut in enumerate([0, 7, 8, 60, len(good) // 3, len(good) - 2]):
        (cases / f"bad_trunc{i}.rnnc").write_bytes(good[:cut])
    for i, pos in enumerate(sorted(set(rng.integers(0, len(good), 60).tolist()))):
        b = bytearray(good)
        b[pos] ^= 0xFF
        (cases / f"bad_flip{i}.rnnc").write_bytes(bytes(b))
    (cases / "bad_huge.rnnc").write_bytes((2**63).to_bytes(8, "little") + good[8:])
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([str(exe), str(cases)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "0 failed" in out.stdout
    assert "ERROR: AddressSanitizer" not in out.stderr and "runtime error" not in out.stderr
