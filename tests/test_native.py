"""The C++ and C APIs: the CMake package inside the installed package builds the examples,
their outputs equal Python's predict/step on the same file, and the C API (driven through
ctypes, in child processes where a crash would matter) refuses damaged files and bad
arguments with error codes."""
import ctypes
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import rnncore as rc
from conftest import run_child

ROOT = Path(__file__).resolve().parents[1]
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None and shutil.which("c++") is None,
                                 reason="no cmake / C++ compiler")


def models(tmp):
    rng = np.random.default_rng(0)
    out = {}
    m = rc.Sequential(rc.Embedding(12, 8, seed=0), rc.LSTM(8, 16, num_layers=2, batch_first=True, seed=1),
                      rc.Dense(16, 12, seed=2))
    m.save(tmp / "lm.rnnc")
    out["lm"] = (m, rng.integers(0, 12, (5, 3)).astype(np.float32)[..., None])        # (T, B, 1) ids
    c = rc.Sequential(rc.GRU(4, 10, batch_first=True, linear_before_reset=False, seed=0), rc.Dropout(0.2),
                      rc.LastStep(), rc.Dense(10, 6, activation="tanh", seed=1), rc.Dense(6, 3, seed=2))
    c.save(tmp / "clf.rnnc")
    out["clf"] = (c, rng.standard_normal((7, 2, 4)).astype(np.float32))
    p = rc.Sequential(rc.LSTM(3, 12, proj_size=5, peephole=True, batch_first=True, seed=3), rc.Dense(5, 2, seed=4))
    p.save(tmp / "proj.rnnc")
    out["proj"] = (p, rng.standard_normal((6, 2, 3)).astype(np.float32))
    b = rc.RNN(3, 7, num_layers=2, bidirectional=True, nonlinearity="relu", seed=5)
    b.save(tmp / "birnn.rnnc")
    out["birnn"] = (b, rng.standard_normal((6, 2, 3)).astype(np.float32))
    return out


def python_outputs(model, x):
    """Python's predict (time-major x) and its step-by-step outputs."""
    if isinstance(model, rc.layers._Recurrent):
        model.eval()
        y = model(x)[0]
        steps = None
        if not model.bidirectional:
            st = model.initial_state(x.shape[1])
            steps = np.stack([model.step(x[t], st)[0] for t in range(x.shape[0])])
        return y, steps
    model.eval()
    xb = x.transpose(1, 0, 2)
    if isinstance(model.blocks[0], (rc.Embedding, rc.OneHot)):
        xb = xb[..., 0].astype(np.int64)
    y = model.predict(xb)
    y = y if y.ndim == 2 else y.transpose(1, 0, 2)
    # step by step: one step of each layer at a time, the Dense head on every step
    states = None
    outs = []
    for t in range(x.shape[0]):
        o, states = model._run(xb[:, t:t + 1], None, states, keep=False)
        outs.append(o if o.ndim == 2 else o[:, 0])
    return y, np.stack(outs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not available")
    tmp = tmp_path_factory.mktemp("native")
    exes = {}
    for name, exe in (("cpp", "rnncore_generate"), ("c", "rnncore_classify")):
        b = tmp / f"build-{name}"
        cfg = subprocess.run(["cmake", "-S", str(ROOT / "examples" / name), "-B", str(b),
                              f"-Drnncore_DIR={rc.get_cmake_dir()}", "-DCMAKE_BUILD_TYPE=Release"],
                             capture_output=True, text=True)
        assert cfg.returncode == 0, cfg.stdout + cfg.stderr
        bld = subprocess.run(["cmake", "--build", str(b)], capture_output=True, text=True)
        assert bld.returncode == 0, bld.stdout + bld.stderr
        exes[name] = b / exe
    return exes, tmp


@pytest.mark.parametrize("which", ["cpp", "c"])
def test_examples_match_python(built, which, tmp_path):
    exes, _ = built
    for name, (model, x) in models(tmp_path).items():
        T, B = x.shape[:2]
        out = subprocess.run([str(exes[which]), str(tmp_path / f"{name}.rnnc"), str(T), str(B)],
                             input=" ".join(f"{v:.9g}" for v in x.ravel()), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
        y_py, steps_py = python_outputs(model, x)
        y_c = np.array(lines["predict"].split(), dtype=np.float64)
        np.testing.assert_allclose(y_c, y_py.ravel(), rtol=1e-6, atol=1e-6, err_msg=f"{which} {name} predict")
        if steps_py is not None:
            s_c = np.array(lines["step"].split(), dtype=np.float64)
            np.testing.assert_allclose(s_c, steps_py.ravel(), rtol=1e-6, atol=1e-6, err_msg=f"{which} {name} step")
        else:
            assert "step" not in lines


def c_api():
    lib = ctypes.CDLL(rc.get_library())
    P = ctypes.c_void_p
    lib.rnncore_model_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(P)]
    lib.rnncore_last_error.restype = ctypes.c_char_p
    lib.rnncore_model_free.argtypes = [P]
    lib.rnncore_model_input_size.argtypes = [P]
    lib.rnncore_model_input_size.restype = ctypes.c_int64
    lib.rnncore_model_output_size.argtypes = [P]
    lib.rnncore_model_output_size.restype = ctypes.c_int64
    fp = ctypes.POINTER(ctypes.c_float)
    ip = ctypes.POINTER(ctypes.c_int64)
    lib.rnncore_predict.argtypes = [P, fp, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ip, fp, ctypes.c_int64]
    lib.rnncore_state_create.argtypes = [P, ctypes.c_int64, ctypes.POINTER(P)]
    lib.rnncore_state_free.argtypes = [P]
    lib.rnncore_step.argtypes = [P, P, fp, ctypes.c_int64, ctypes.c_int64, fp, ctypes.c_int64]
    lib.rnncore_kept_memory.restype = ctypes.c_int64
    return lib


def fptr(a):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


@pytest.mark.parametrize("hidden", [32, 256])
def test_c_api_from_several_threads(tmp_path, hidden):
    """Six threads step one model at once, each with its own state; at hidden=256 each step
    also splits its unit groups over a team of its own (step_threads)."""
    lib = c_api()
    m = rc.Sequential(rc.GRU(4, hidden, batch_first=True, seed=0), rc.Dense(hidden, 3, seed=1))
    m.save(tmp_path / "g.rnnc")
    handle = ctypes.c_void_p()
    assert lib.rnncore_model_load(str(tmp_path / "g.rnnc").encode(), ctypes.byref(handle)) == 0
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((20, 1, 4)).astype(np.float32) for _ in range(6)]
    want = [m.predict(x.transpose(1, 0, 2)).transpose(1, 0, 2) for x in xs]
    got = [None] * 6

    def run(i):
        st = ctypes.c_void_p()
        assert lib.rnncore_state_create(handle, 1, ctypes.byref(st)) == 0
        ys = np.zeros((20, 1, 3), np.float32)
        for t in range(20):
            xt = np.ascontiguousarray(xs[i][t])
            yt = np.zeros((1, 3), np.float32)
            assert lib.rnncore_step(handle, st, fptr(xt), 1, 4, fptr(yt), 3) == 0
            ys[t] = yt
        lib.rnncore_state_free(st)
        got[i] = ys

    ts = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    y = np.zeros(20 * 1 * 3, np.float32)
    x = np.ascontiguousarray(xs[0])
    assert lib.rnncore_predict(handle, fptr(x), 20, 1, 4, None, fptr(y), y.size) == 0
    np.testing.assert_allclose(y, want[0].ravel(), rtol=1e-6, atol=1e-6)
    lib.rnncore_model_free(handle)


def test_c_api_releases_kept_memory(tmp_path):
    lib = c_api()
    m = rc.Sequential(rc.LSTM(4, 64, batch_first=True, seed=0), rc.Dense(64, 3, seed=1))
    m.save(tmp_path / "l.rnnc")
    handle = ctypes.c_void_p()
    assert lib.rnncore_model_load(str(tmp_path / "l.rnnc").encode(), ctypes.byref(handle)) == 0
    x = np.random.default_rng(2).standard_normal((50, 16, 4)).astype(np.float32)
    y0, y1 = np.zeros(50 * 16 * 3, np.float32), np.zeros(50 * 16 * 3, np.float32)
    lib.rnncore_release_memory()
    assert lib.rnncore_kept_memory() == 0
    assert lib.rnncore_predict(handle, fptr(x), 50, 16, 4, None, fptr(y0), y0.size) == 0
    assert lib.rnncore_kept_memory() >= 2 * 2 * 16 * 64 * 4    # two steps of h and c at least
    lib.rnncore_release_memory()
    assert lib.rnncore_kept_memory() == 0
    assert lib.rnncore_predict(handle, fptr(x), 50, 16, 4, None, fptr(y1), y1.size) == 0
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_allclose(y0.reshape(50, 16, 3), m.predict(x.transpose(1, 0, 2)).transpose(1, 0, 2),
                               rtol=1e-5, atol=1e-6)
    lib.rnncore_model_free(handle)


C_ERRORS = """
import ctypes, sys, numpy as np
sys.path.insert(0, {tests!r})
from test_native import c_api, fptr
lib = c_api()
h = ctypes.c_void_p()
res = []
def code(rc):
    res.append((rc, lib.rnncore_last_error().decode('utf-8', 'replace')))
code(lib.rnncore_model_load({missing!r}.encode(), ctypes.byref(h)))
code(lib.rnncore_model_load(None, ctypes.byref(h)))
code(lib.rnncore_model_load({good!r}.encode(), None))
for bad in {bad_files!r}:
    code(lib.rnncore_model_load(bad.encode(), ctypes.byref(h)))
assert lib.rnncore_model_load({good!r}.encode(), ctypes.byref(h)) == 0
x = np.zeros((3, 2, 4), np.float32); y = np.zeros(100, np.float32)
code(lib.rnncore_predict(h, fptr(x), 3, 2, 5, None, fptr(y), 100))          # wrong I
code(lib.rnncore_predict(h, fptr(x), 3, 2, 4, None, fptr(y), 5))            # y too small
code(lib.rnncore_predict(h, None, 3, 2, 4, None, fptr(y), 100))             # NULL x
code(lib.rnncore_predict(h, fptr(x), 0, 2, 4, None, fptr(y), 100))          # T = 0
lens = np.array([9, 1], np.int64)
code(lib.rnncore_predict(h, fptr(x), 3, 2, 4, lens.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), fptr(y), 100))
st = ctypes.c_void_p()
code(lib.rnncore_state_create(h, 0, ctypes.byref(st)))
assert lib.rnncore_state_create(h, 2, ctypes.byref(st)) == 0
code(lib.rnncore_step(h, st, fptr(x), 3, 4, fptr(y), 100))                  # wrong B
code(lib.rnncore_step(None, st, fptr(x), 2, 4, fptr(y), 100))
print("RESULTS", res)
"""


def test_c_api_refuses_bad_files_and_arguments(tmp_path):
    m = rc.Sequential(rc.LSTM(4, 6, batch_first=True, seed=0), rc.Dense(6, 2, seed=1))
    good = tmp_path / "good.rnnc"
    m.save(good)
    blob = good.read_bytes()
    bad = []
    rng = np.random.default_rng(0)
    for i, cut in enumerate([0, 5, 8, 40, len(blob) // 2, len(blob) - 1]):
        p = tmp_path / f"trunc{i}.rnnc"
        p.write_bytes(blob[:cut])
        bad.append(str(p))
    for i, pos in enumerate(sorted(set(rng.integers(0, len(blob), 80).tolist()))):
        b = bytearray(blob)
        b[pos] ^= 0xFF
        p = tmp_path / f"flip{i}.rnnc"
        p.write_bytes(bytes(b))
        bad.append(str(p))
    p = tmp_path / "huge.rnnc"
    p.write_bytes((2**62).to_bytes(8, "little") + blob[8:])
    bad.append(str(p))
    f64 = rc.Sequential(rc.GRU(2, 3, batch_first=True, dtype="float64"), rc.Dense(3, 1, dtype="float64"))
    f64.save(tmp_path / "f64.rnnc")
    bad.append(str(tmp_path / "f64.rnnc"))
    s2s = rc.Seq2Seq(5, 5, embed=4, hidden=4)
    s2s.save(tmp_path / "s2s.rnnc")
    bad.append(str(tmp_path / "s2s.rnnc"))
    out = run_child(C_ERRORS.format(tests=str(Path(__file__).parent), missing=str(tmp_path / "nope.rnnc"),
                                    good=str(good), bad_files=bad))
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULTS")][0]
    res = eval(line[len("RESULTS "):])
    codes = [c for c, _ in res]
    assert codes[0] == 2 and "cannot open" in res[0][1]                 # missing file
    assert codes[1] == 1 and codes[2] == 1                              # NULL arguments
    nb = len(bad)
    for (c, msg), path in zip(res[3:3 + nb], bad):
        assert c == 3, (path, c, msg)
        assert msg
    assert "float32" in res[3 + nb - 2][1]
    assert "not supported" in res[3 + nb - 1][1]
    rest = res[3 + nb:]
    assert [c for c, _ in rest] == [1] * len(rest), rest
    assert "I: expected 4, got 5" in rest[0][1]
    assert "y_capacity" in rest[1][1]
    assert "lengths" in rest[4][1]


TEAM_CMAKE = """cmake_minimum_required(VERSION 3.18)
project(team_change CXX)
set(CMAKE_CXX_STANDARD 17)
find_package(rnncore REQUIRED)
find_package(OpenMP REQUIRED)
add_executable(test_team_change {src})
target_link_libraries(test_team_change PRIVATE rnncore::rnncore OpenMP::OpenMP_CXX)
"""


def test_backward_with_a_smaller_team_than_the_forward(tmp_path):
    """The C++ layer API: a training forward with two threads, then the backward from inside
    an active OpenMP region (its team: one thread). The gate activations the forward kept
    blocked for two threads are converted back and every gradient equals the one of a
    backward called outside (tests/cpp/test_team_change.cpp)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not available")
    if not rc.info()["openmp"]:
        pytest.skip("rnncore built without OpenMP: one thread, no teams")
    src = (ROOT / "tests" / "cpp" / "test_team_change.cpp").as_posix()
    (tmp_path / "CMakeLists.txt").write_text(TEAM_CMAKE.format(src=src))
    b = tmp_path / "build"
    cfg = subprocess.run(["cmake", "-S", str(tmp_path), "-B", str(b), f"-Drnncore_DIR={rc.get_cmake_dir()}",
                          "-DCMAKE_BUILD_TYPE=Release"], capture_output=True, text=True)
    if cfg.returncode != 0 and "OpenMP" in cfg.stdout + cfg.stderr:
        pytest.skip("no OpenMP for the C++ compiler")
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    bld = subprocess.run(["cmake", "--build", str(b)], capture_output=True, text=True)
    assert bld.returncode == 0, bld.stdout + bld.stderr
    run = subprocess.run([str(b / "test_team_change")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "checked 24" in run.stdout, run.stdout


def test_cmake_dir_command():
    out = subprocess.run([sys.executable, "-m", "rnncore", "--cmake-dir"], capture_output=True, text=True)
    assert out.returncode == 0
    d = Path(out.stdout.strip())
    assert (d / "rnncoreConfig.cmake").is_file() and (d / "rnncoreTargets.cmake").is_file()
    assert Path(rc.get_include(), "rnncore", "rnncore.h").is_file()
    assert os.path.isfile(rc.get_library())


STEP_VARIANTS = {
    "lstm": lambda I, H: rc.LSTM(I, H, num_layers=2, seed=3),
    "lstm_peep": lambda I, H: rc.LSTM(I, H, peephole=True, seed=3),
    "lstm_coupled_peep": lambda I, H: rc.LSTM(I, H, peephole=True, coupled_gates=True, seed=3),
    "lstm_nobias": lambda I, H: rc.LSTM(I, H, bias=False, seed=3),
    "lstm_proj": lambda I, H: rc.LSTM(I, H, proj_size=max(1, H // 3), seed=3),
    "gru": lambda I, H: rc.GRU(I, H, num_layers=2, seed=3),
    "gru_nobias": lambda I, H: rc.GRU(I, H, bias=False, seed=3),
    "gru_orig": lambda I, H: rc.GRU(I, H, linear_before_reset=False, seed=3),
    "rnn_tanh": lambda I, H: rc.RNN(I, H, num_layers=2, seed=3),
    "rnn_relu": lambda I, H: rc.RNN(I, H, nonlinearity="relu", seed=3),
}


@pytest.mark.parametrize("isa", rc._core.available_isas().split(","))
def test_c_step_equals_python_for_every_cell_size_and_isa(tmp_path, isa):
    """The C API's step (weights packed at load; fused one-pass kernels for LSTM, GRU and RNN:
    on AVX-512 up to three batch rows a pass whole and four to six in two halves of the
    accumulators (13 rows: 6 + 6 + 1), on AVX2 up to two rows a pass in halves, where from
    four rows the row-major step takes over) equals the Python layer over a sequence, for every variant,
    sizes that are not multiples of the unit groups (the plain RNN's groups of 4 or 8 vectors of
    units), batch 1-5, 7 and 13, two layers, in a
    child process per ISA (the library chooses its kernels once)."""
    cases = []
    rng = np.random.default_rng(5)
    for name, make in STEP_VARIANTS.items():
        # the plain RNN also over several 4-vector unit groups with a partial last one (H=200 on
        # AVX-512) and several groups of 8 (H=300)
        extra = ((8, 200), (5, 300)) if name == "rnn_tanh" else ()
        for I, H in ((3, 5), (32, 64), (17, 70), (9, 130)) + extra:
            layer = make(I, H)
            path = tmp_path / f"{name}_{I}_{H}.rnnc"
            layer.save(path)
            x = rng.standard_normal((12, 13, I)).astype(np.float32)
            y, _ = layer(x)
            np.save(tmp_path / f"{name}_{I}_{H}_x.npy", x)
            np.save(tmp_path / f"{name}_{I}_{H}_y.npy", y)
            cases.append((str(path), f"{name}_{I}_{H}"))
    code = f"""
import ctypes, sys, numpy as np
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_native import c_api, fptr
lib = c_api()
bad = []
for path, stem in {cases!r}:
  for B in (1, 2, 3, 4, 5, 7, 13):   # batch rows are independent: the first B of the sequence
    x = np.load({str(tmp_path)!r} + "/" + stem + "_x.npy")[:, :B]
    want = np.load({str(tmp_path)!r} + "/" + stem + "_y.npy")[:, :B]
    h = ctypes.c_void_p()
    assert lib.rnncore_model_load(path.encode(), ctypes.byref(h)) == 0, lib.rnncore_last_error()
    st = ctypes.c_void_p()
    assert lib.rnncore_state_create(h, B, ctypes.byref(st)) == 0
    O = want.shape[-1]
    got = np.zeros_like(want)
    for t in range(x.shape[0]):
        xt = np.ascontiguousarray(x[t])
        yt = np.zeros((B, O), np.float32)
        assert lib.rnncore_step(h, st, fptr(xt), B, x.shape[2], fptr(yt), yt.size) == 0, lib.rnncore_last_error()
        got[t] = yt
    err = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))
    if not err <= 2e-6:
        bad.append((stem, B, err))
    lib.rnncore_state_free(st)
    lib.rnncore_model_free(h)
print("BAD", bad)
assert not bad, bad
"""
    # three threads: the larger layers' steps split their unit groups over a team of three
    # (step_threads), the smaller ones stay on one thread
    env = dict(os.environ, RNNCORE_ISA=isa, OMP_NUM_THREADS="3")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
