"""Side-by-side timing of rnncore against NumPy, PyTorch (CPU) and ONNX Runtime.

Same weights, same thread count, one run, every library timed in turn in each of ROUNDS rounds
(the median of its rounds is its figure); prints each time, rnncore's ratio to the fastest
peer (below 1 means rnncore is faster), achieved GFLOP/s against the machine's sgemm peak
measured in the same run, weight bytes streamed per second at batch 1 against the measured
cache bandwidth, and a markdown table. Peers that are not installed are skipped.

    python benchmarks/run.py            # the full set of shapes (also: rnncore bench --full)
    rnncore bench                       # a short version
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np

# The speed issue's shapes, and the small layer of its one-step comparison (I=32, H=64) over a
# whole sequence: NumPy's per-op overhead against rnncore's whole-sequence call.
# A fifth number is the layers of a stack (default 1): a two-layer stack at batch 1, the shape
# of a streaming model, whose layers rnncore runs at once (the layer pipeline).
FULL_SHAPES = [(100, 1, 32, 64), (100, 1, 128, 256), (100, 16, 128, 256), (100, 64, 256, 512),
               (50, 32, 1024, 1024), (25, 1, 1024, 1024), (25, 4, 1024, 1024), (100, 1, 64, 128, 2)]
QUICK_SHAPES = [(100, 1, 128, 256), (100, 16, 128, 256)]
CELLS = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


# Pause before each timing so the thread pool of the library timed before it has stopped
# spinning: ONNX Runtime's and OpenBLAS's workers spin for up to about 200 ms after a call, and
# whatever runs on the same cores meanwhile is slowed (measured on a 2-core machine, LSTM
# T=100 B=16 H=256 timed right after an ONNX Runtime run: 25-26 ms; 50 ms later: 22; 200 ms
# later: 14.6, as without it; after a NumPy matmul: 26-50 ms against 15).
SETTLE_S = 0.3


def _median_time(fn, min_time=0.3, max_reps=200, warmup=2, min_reps=5):
    time.sleep(SETTLE_S)
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ---------------------------------------------------------------- NumPy reference peer
def _sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def layers_of(shape):
    return shape[4] if len(shape) > 4 else 1


def shape_str(shape):
    s = ", ".join(map(str, shape[:4]))
    return s + (f" ({shape[4]} layers)" if layers_of(shape) > 1 else "")


def numpy_forward(cell, p, x):
    """A clean vectorised NumPy implementation: one matmul for the input projection of all
    steps, then per step one matmul and the gate arithmetic; layer after layer for a stack."""
    y, h = _numpy_layer(cell, p, x, 0)
    for k in range(1, sum(1 for n in p if n.startswith("weight_hh_l"))):
        y, h = _numpy_layer(cell, p, y, k)
    return y, h


def _numpy_layer(cell, p, x, k):
    T, B, _ = x.shape
    Wi, Wh, bi, bh = p[f"weight_ih_l{k}"], p[f"weight_hh_l{k}"], p[f"bias_ih_l{k}"], p[f"bias_hh_l{k}"]
    H = Wh.shape[1]
    gx = (x.reshape(T * B, -1) @ Wi.T).reshape(T, B, -1)
    WhT = np.ascontiguousarray(Wh.T)
    h = np.zeros((B, H), x.dtype)
    c = np.zeros((B, H), x.dtype)
    y = np.empty((T, B, H), x.dtype)
    if cell == "LSTM":
        gx += bi + bh
        for t in range(T):
            a = gx[t] + h @ WhT
            i, f, g, o = _sig(a[:, :H]), _sig(a[:, H:2 * H]), np.tanh(a[:, 2 * H:3 * H]), _sig(a[:, 3 * H:])
            c = f * c + i * g
            h = o * np.tanh(c)
            y[t] = h
    elif cell == "GRU":
        gx[..., :2 * H] += bi[:2 * H] + bh[:2 * H]
        gx[..., 2 * H:] += bi[2 * H:]
        for t in range(T):
            hh = h @ WhT
            r = _sig(gx[t, :, :H] + hh[:, :H])
            z = _sig(gx[t, :, H:2 * H] + hh[:, H:2 * H])
            n = np.tanh(gx[t, :, 2 * H:] + r * (hh[:, 2 * H:] + bh[2 * H:]))
            h = (1 - z) * n + z * h
            y[t] = h
    else:
        gx += bi + bh
        for t in range(T):
            h = np.tanh(gx[t] + h @ WhT)
            y[t] = h
    return y, h


def numpy_step(cell, p, x, state):
    Wi, Wh, bi, bh = p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"], p["bias_hh_l0"]
    H = Wh.shape[1]
    if cell == "LSTM":
        h, c = state
        a = x @ Wi.T + bi + h @ Wh.T + bh
        i, f, g, o = _sig(a[:, :H]), _sig(a[:, H:2 * H]), np.tanh(a[:, 2 * H:3 * H]), _sig(a[:, 3 * H:])
        c = f * c + i * g
        return o * np.tanh(c), c
    if cell == "GRU":
        gx = x @ Wi.T + bi
        hh = state @ Wh.T + bh
        r = _sig(gx[:, :H] + hh[:, :H])
        z = _sig(gx[:, H:2 * H] + hh[:, H:2 * H])
        n = np.tanh(gx[:, 2 * H:] + r * hh[:, 2 * H:])
        return (1 - z) * n + z * state
    return np.tanh(x @ Wi.T + bi + state @ Wh.T + bh)


# ---------------------------------------------------------------- peers
class Peers:
    def __init__(self, threads):
        self.threads = threads
        try:
            import torch
            torch.set_num_threads(threads)
            self.torch = torch
        except ImportError:
            self.torch = None
        try:
            import onnxruntime
            onnxruntime.set_default_logger_severity(3)
            self.ort = onnxruntime
        except ImportError:
            self.ort = None
        try:
            from threadpoolctl import threadpool_limits
            self._limits = threadpool_limits(limits=threads)
        except ImportError:
            self._limits = None

    def torch_module(self, cell, layer):
        t = getattr(self.torch.nn, cell)(layer.input_size, layer.hidden_size, num_layers=layer.num_layers)
        t.load_state_dict({k: self.torch.from_numpy(v.copy()) for k, v in layer.state_dict().items()})
        return t

    def ort_session(self, tmod, x):
        torch = self.torch
        f = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(tmod, (torch.from_numpy(x),), f, dynamo=False, input_names=["x"],
                              output_names=["y"] + (["h", "c"] if isinstance(tmod, torch.nn.LSTM) else ["h"]))
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return self.ort.InferenceSession(f.getvalue(), so, providers=["CPUExecutionProvider"])


def sgemm_peak(peers, threads):
    """GFLOP/s of a large fp32 matrix product: PyTorch's (MKL/oneDNN) when installed, and
    rnncore's own GEMM (on AMX where it is in use, then also on the FMA units: rnncore_fma)."""
    from . import _core
    n = 1536
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    res = {}
    if peers.torch is not None:
        ta = peers.torch.from_numpy(a)
        t = _median_time(lambda: peers.torch.mm(ta, ta), min_time=0.5)
        res["torch"] = 2 * n ** 3 / t / 1e9
    t = _median_time(lambda: _core.gemm(a, a), min_time=0.5)
    res["rnncore"] = 2 * n ** 3 / t / 1e9
    if _core.amx_enabled():   # rnncore's GEMM above ran on AMX (bf16x6); the FMA units' too
        _core.set_amx(False)
        try:
            t = _median_time(lambda: _core.gemm(a, a), min_time=0.5)
            res["rnncore_fma"] = 2 * n ** 3 / t / 1e9
        finally:
            _core.set_amx(True)
    return res


def cache_bandwidth(threads):
    """Read GB/s of one thread at L2-sized (256 KiB) and L3-sized (8 MiB) buffers, and the round
    trip between two threads of rnncore's team in ns (NaN with one thread)."""
    from . import _core
    return {"l2_per_core": _core.read_bandwidth(256 * 1024, 2000),
            "l3_per_core": _core.read_bandwidth(8 * 1024 * 1024, 40),
            "round_trip_ns": round_trip(threads)}


def round_trip(threads, bursts=5, rounds=20000):
    """Median over bursts of the ns of one round trip between two threads of rnncore's team
    through a cache line: a team of two meets once a recurrence step, so T of them bound a
    batch-1 call from below. On a shared cloud machine it moves with where the host runs the
    two vCPUs (64-900 ns from run to run and within one process over seconds: session 36 in
    benchmarks/RESULTS.md)."""
    from . import _core
    if threads < 2:
        return float("nan")
    _core.round_trip_ns(1000)   # (wakes the team)
    return float(np.median([_core.round_trip_ns(rounds) for _ in range(bursts)]))


# Shapes whose batch is at most this are also timed with bfloat16 recurrent weights.
BF16_MAX_BATCH = 4


def flops(cell, T, B, I, H, L=1):
    return 2.0 * T * B * GATES[cell] * H * (I + H + (L - 1) * 2 * H)


# Every library is timed in each of ROUNDS rounds, in turn, and its figure is the median of its
# rounds: a drift of the machine over a shape's timings (other tenants; seen here: one build's
# LSTM T=100 B=1 at 1.37 ms in one run and 1.84 in the next) then reaches every library alike
# instead of whichever happened to run during it.
ROUNDS = 3


def _interleaved(fns, rounds=ROUNDS):
    """{name: (callable, keyword arguments of _median_time)} -> {name: (median of the rounds,
    the rounds' times)}."""
    times = {k: [] for k in fns}
    for r in range(rounds):
        for k, (fn, opts) in fns.items():
            times[k].append(_median_time(fn, **dict(opts, warmup=2 if r == 0 else 1)))
    return {k: (float(np.median(v)), v) for k, v in times.items()}


def bench_shape(cell, shape, peers, train=True, input_grad=True):
    import rnncore as rc
    T, B, I, H = shape[:4]
    L = layers_of(shape)
    rng = np.random.default_rng(0)
    layer = getattr(rc, cell)(I, H, num_layers=L, seed=0)
    layer.eval()
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    row = {"cell": cell, "shape": shape}
    per = {"min_time": 0.3 / ROUNDS}
    p = layer.state_dict()
    ref, _ = layer(x)
    np.testing.assert_allclose(numpy_forward(cell, p, x)[0], ref, rtol=1e-3, atol=1e-4)
    fns = {"rnncore": (lambda: layer(x), per),
           "numpy": (lambda: numpy_forward(cell, p, x), dict(per, max_reps=7))}
    if B <= BF16_MAX_BATCH:
        # bfloat16 recurrent weights (an opt-in of inference): half the bytes of W_hh per step
        layer16 = copy.deepcopy(layer)
        layer16.inference_precision = "bfloat16"
        y16, _ = layer16(x)
        row["bf16_err"] = float(np.abs(y16 - ref).max() / max(1.0, float(np.abs(ref).max())))
        fns["rnncore_bf16"] = (lambda: layer16(x), per)
        # a frozen copy (frozen(): the same kernels, without the per-call check of the kept
        # packed weights against the parameters; ONNX Runtime's session is frozen likewise)
        frozen = layer.frozen()
        if not np.array_equal(frozen(x)[0], ref):
            raise AssertionError(f"{cell} {shape}: the frozen copy's output differs")
        fns["rnncore_frozen"] = (lambda: frozen(x), per)
    train_fns = {}
    if peers.torch is not None:
        torch = peers.torch
        tm = peers.torch_module(cell, layer)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            np.testing.assert_allclose(tm(xt)[0].numpy(), ref, rtol=1e-3, atol=1e-4)

        def torch_infer():
            with torch.no_grad():
                return tm(xt)

        fns["torch"] = (torch_infer, per)
        if peers.ort is not None:
            sess = peers.ort_session(tm, x)
            np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref, rtol=1e-3, atol=1e-4)
            fns["ort"] = (lambda: sess.run(None, {"x": x}), per)
        if train:
            dy = rng.standard_normal(ref.shape).astype(np.float32)
            trainee = copy.deepcopy(layer)
            trainee.train()

            def ours_train():
                trainee.forward(x)
                trainee.backward(dy, input_grad=input_grad)

            dyt = torch.from_numpy(dy)
            # input_grad=False: a training step on data (no gradient of x in either library)
            xg = torch.from_numpy(x.copy()).requires_grad_(input_grad)

            def torch_train():
                y, _ = tm(xg)
                (y * dyt).sum().backward()

            train_fns = {"train_rnncore": (ours_train, dict(per, max_reps=20, min_reps=3)),
                         "train_torch": (torch_train, dict(per, max_reps=20, min_reps=3))}
    timed = _interleaved(fns)
    if train_fns:
        timed.update(_interleaved(train_fns))
    row["rounds"] = {k: v for k, (_, v) in timed.items()}
    row.update({k: t for k, (t, _) in timed.items()})
    row["gflops"] = flops(cell, T, B, I, H, L) / row["rnncore"] / 1e9
    G = GATES[cell]
    row["whh_gbs"] = L * T * G * H * H * 4 / row["rnncore"] / 1e9   # recurrent weights streamed
    peer_keys = [k for k in ("numpy", "torch", "ort") if k in row]
    best = min(peer_keys, key=lambda k: row[k])
    row["best_peer"] = best
    row["ratio"] = row["rnncore"] / row[best]
    row["ratio_rounds"] = [a / b for a, b in zip(row["rounds"]["rnncore"], row["rounds"][best])]
    row["ratio_numpy"] = row["rnncore"] / row["numpy"]
    if "rnncore_bf16" in row:
        row["ratio_bf16"] = row["rnncore_bf16"] / row[best]
    if "rnncore_frozen" in row:
        row["ratio_frozen"] = row["rnncore_frozen"] / row[best]
    if "train_torch" in row:
        row["train_ratio"] = row["train_rnncore"] / row["train_torch"]
    if "train_rnncore" in row:
        # forward + backward: the backward's products (dh, dW_ih | dW_hh, dx) are twice the forward's
        # (without the input's gradient, less the first layer's dx: the size of its projection)
        train_flops = 3 * flops(cell, T, B, I, H, L) - (0 if input_grad else 2.0 * T * B * G * H * I)
        row["train_gflops"] = train_flops / row["train_rnncore"] / 1e9
    return row


def bench_step(cell, peers, I=32, H=64, n=3000):
    import rnncore as rc
    layer = getattr(rc, cell)(I, H, seed=0)
    layer.eval()
    x = np.random.default_rng(0).standard_normal((1, I)).astype(np.float32)
    st = layer.initial_state(1)

    def loop(fn):
        def run():
            for _ in range(n):
                fn()
        return _median_time(run, min_time=0.2, max_reps=10) / n

    row = {"cell": cell, "rnncore": loop(lambda: layer.step(x, st))}
    # a frozen() copy: its steps read weights packed once for the fused step kernels
    fz = layer.frozen()
    fst = fz.initial_state(1)
    row["frozen"] = loop(lambda: fz.step(x, fst))
    p = layer.state_dict()
    nst = (np.zeros((1, H), np.float32), np.zeros((1, H), np.float32)) if cell == "LSTM" else np.zeros((1, H), np.float32)
    row["numpy"] = loop(lambda: numpy_step(cell, p, x, nst))
    if peers.torch is not None:
        torch = peers.torch
        c = getattr(torch.nn, cell + "Cell")(I, H)
        xt = torch.from_numpy(x)
        hx = (torch.zeros(1, H), torch.zeros(1, H)) if cell == "LSTM" else torch.zeros(1, H)
        with torch.no_grad():
            row["torch"] = loop(lambda: c(xt, hx))
        row["ratio_torch"] = row["rnncore"] / row["torch"]
        row["ratio_frozen_torch"] = row["frozen"] / row["torch"]
    row["ratio_numpy"] = row["rnncore"] / row["numpy"]
    return row


_RSS_CODE = r"""
import sys, numpy as np
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return float(line.split()[1]) / 1024.0
def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
lib, T, B, I, H = sys.argv[1], *map(int, sys.argv[2:6])
x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
dy = np.ones((T, B, H), np.float32)
if lib == "rnncore":
    import rnncore
    rnncore.set_num_threads(int(sys.argv[6]))
    m = rnncore.LSTM(I, H, seed=0)
    def step():
        m.forward(x); m.backward(dy)
else:
    import torch
    torch.set_num_threads(int(sys.argv[6]))
    m = torch.nn.LSTM(I, H)
    xt = torch.from_numpy(x).requires_grad_(); dyt = torch.from_numpy(dy)
    def step():
        y, _ = m(xt); (y * dyt).sum().backward()
base = status("VmRSS:")
reset_peak()
for _ in range(3):
    step()
print(status("VmHWM:") - base)
"""


def training_peak_rss(shape, threads, have_torch):
    """Peak RSS growth (MiB) of LSTM training at `shape`, each library in its own process."""
    res = {}
    for lib in ("rnncore", "torch") if have_torch else ("rnncore",):
        out = subprocess.run([sys.executable, "-c", _RSS_CODE, lib, *map(str, shape), str(threads)],
                             capture_output=True, text=True, timeout=600)
        if out.returncode == 0:
            res[lib] = float(out.stdout.strip().splitlines()[-1])
    return res


def _fmt_ns(v):   # the round trip: n/a with one thread (NaN)
    return "n/a (one thread)" if v != v else f"{v:.0f} ns"


def _fmt_ms(v):
    return "-" if v is None else f"{v * 1e3:.2f}"


def run(shapes, threads, train=True, rss=True, out_json=None, cells=None, step=True, input_grad=True):
    import rnncore as rc
    rc.set_num_threads(threads)
    peers = Peers(threads)
    info = rc.info()
    print(f"rnncore {info['version']} isa={info['isa']} threads={threads}; "
          f"torch={'yes' if peers.torch else 'no'} onnxruntime={'yes' if peers.ort else 'no'}"
          + ("" if input_grad else "; training without the input's gradient (both libraries)"), flush=True)
    peak = sgemm_peak(peers, threads)
    bw = cache_bandwidth(threads)
    print("sgemm peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()) +
          f"; read bandwidth per core GB/s: L2 {bw['l2_per_core']:.0f}, L3 {bw['l3_per_core']:.0f}"
          f"; round trip between two threads {_fmt_ns(bw['round_trip_ns'])}", flush=True)
    machine_peak = max(peak.values())
    rows = []
    for cell in cells or CELLS:
        for shape in shapes:
            r = bench_shape(cell, shape, peers, train=train, input_grad=input_grad)
            rows.append(r)
            msg = (f"{cell:4s} T={shape[0]:3d} B={shape[1]:2d} I={shape[2]:4d} H={shape[3]:4d}"
                   + (f" L={layers_of(shape)}" if layers_of(shape) > 1 else "") + "  "
                   f"rnncore {_fmt_ms(r['rnncore'])} ms  numpy {_fmt_ms(r.get('numpy'))}  "
                   f"torch {_fmt_ms(r.get('torch'))}  ort {_fmt_ms(r.get('ort'))}  "
                   f"ratio {r['ratio']:.2f} (vs {r['best_peer']}; rounds {min(r['ratio_rounds']):.2f}-"
                   f"{max(r['ratio_rounds']):.2f})  vs numpy {r['ratio_numpy']:.3f}  "
                   f"{r['gflops']:.0f} GFLOP/s ({100 * r['gflops'] / machine_peak:.0f}% of sgemm peak)")
            if shape[1] == 1:
                msg += f"  W_hh {r['whh_gbs']:.0f} GB/s"
            if "rnncore_frozen" in r:
                msg += f"  | frozen {_fmt_ms(r['rnncore_frozen'])} ms ratio {r['ratio_frozen']:.2f}"
            if "rnncore_bf16" in r:
                msg += (f"  | bf16 W_hh {_fmt_ms(r['rnncore_bf16'])} ms ratio {r['ratio_bf16']:.2f} "
                        f"max rel. change {r['bf16_err']:.1e}")
            if "train_ratio" in r:
                msg += (f"  | train rnncore {_fmt_ms(r['train_rnncore'])} torch {_fmt_ms(r['train_torch'])} "
                        f"ratio {r['train_ratio']:.2f}  {r['train_gflops']:.0f} GFLOP/s "
                        f"({100 * r['train_gflops'] / machine_peak:.0f}% of sgemm peak)")
            print(msg, flush=True)
    steps = [bench_step(c, peers) for c in (cells or CELLS)] if step else []
    for s in steps:
        print(f"step {s['cell']:4s} I=32 H=64 B=1: rnncore {s['rnncore'] * 1e6:.2f} us  frozen "
              f"{s['frozen'] * 1e6:.2f} us  numpy {s['numpy'] * 1e6:.2f} us  torch cell "
              f"{s.get('torch', float('nan')) * 1e6:.2f} us  ratio vs torch {s.get('ratio_torch', float('nan')):.3f} "
              f"(frozen {s.get('ratio_frozen_torch', float('nan')):.3f})  vs numpy {s['ratio_numpy']:.3f}",
              flush=True)
    mem = {}
    if rss:
        mem = training_peak_rss((100, 64, 256, 512), threads, peers.torch is not None)
        print("training peak RSS growth, LSTM T=100 B=64 I=256 H=512 (MiB): " +
              ", ".join(f"{k} {v:.0f}" for k, v in mem.items()), flush=True)
    print()
    print(markdown(rows, steps, mem, peak, bw, threads, info, input_grad))
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"rows": rows, "steps": steps, "rss_mib": mem, "sgemm": peak, "bandwidth": bw,
                       "threads": threads, "info": info, "train_input_grad": input_grad},
                      f, indent=1, default=str)
    return rows, steps


def markdown(rows, steps, mem, peak, bw, threads, info, input_grad=True):
    lines = [f"Times in ms (median of {ROUNDS} interleaved rounds), {threads} threads, fp32, isa {info['isa']}; "
             f"ratio = rnncore / fastest "
             f"peer (< 1: rnncore faster). sgemm peak {max(peak.values()):.0f} GFLOP/s, L2 read "
             f"{bw['l2_per_core']:.0f} GB/s per core, round trip between two threads "
             f"{_fmt_ns(bw['round_trip_ns'])}."
             + ("" if input_grad else " Training without the input's gradient in both libraries "
                "(PyTorch: x without requires_grad; rnncore: backward(input_grad=False))."),
             "",
             "| cell | T, B, I, H | rnncore | NumPy | PyTorch | ONNX Runtime | ratio | vs NumPy | GFLOP/s | train rnncore | train PyTorch | train ratio | train GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {shape_str(r['shape'])} | {_fmt_ms(r['rnncore'])} | "
                     f"{_fmt_ms(r.get('numpy'))} | {_fmt_ms(r.get('torch'))} | {_fmt_ms(r.get('ort'))} | "
                     f"{r['ratio']:.2f} | {r['ratio_numpy']:.3f} | {r['gflops']:.0f} | "
                     f"{_fmt_ms(r.get('train_rnncore'))} | {_fmt_ms(r.get('train_torch'))} | "
                     f"{r.get('train_ratio', float('nan')):.2f} | {r.get('train_gflops', float('nan')):.0f} |")
    if steps:
        lines += ["", "| one step from Python (I=32, H=64, B=1) | rnncore us | frozen us | NumPy us | "
                  "PyTorch cell us | ratio vs PyTorch | frozen ratio |", "|---|---|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['cell']} | {s['rnncore'] * 1e6:.2f} | {s['frozen'] * 1e6:.2f} | {s['numpy'] * 1e6:.2f} | "
                     f"{s.get('torch', float('nan')) * 1e6:.2f} | {s.get('ratio_torch', float('nan')):.3f} | "
                     f"{s.get('ratio_frozen_torch', float('nan')):.3f} |")
    bf = [r for r in rows if "rnncore_bf16" in r]
    if bf:
        lines += ["", f"Batch <= {BF16_MAX_BATCH}: a `frozen()` copy (the same float32 results, no per-call "
                  "check of the kept packed weights), and `inference_precision=\"bfloat16\"` (W_hh rounded "
                  "to bfloat16, half the bytes per step); the change is the bfloat16 output's largest "
                  "difference from the float32 one, relative to its largest value.",
                  "", "| cell | T, B, I, H | rnncore fp32 | frozen | bf16 W_hh | fastest peer | ratio fp32 | ratio frozen | ratio bf16 | change |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in bf:
            lines.append(f"| {r['cell']} | {shape_str(r['shape'])} | {_fmt_ms(r['rnncore'])} | "
                         f"{_fmt_ms(r.get('rnncore_frozen'))} | "
                         f"{_fmt_ms(r['rnncore_bf16'])} | {_fmt_ms(r[r['best_peer']])} ({r['best_peer']}) | "
                         f"{r['ratio']:.2f} | {r.get('ratio_frozen', float('nan')):.2f} | {r['ratio_bf16']:.2f} | "
                         f"{r['bf16_err']:.1e} |")
    if mem:
        lines += ["", "Training peak RSS growth, LSTM T=100 B=64 I=256 H=512: " +
                  ", ".join(f"{k} {v:.0f} MiB" for k, v in mem.items())]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="rnncore bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two batch-1/batch-16 shapes, no training memory")
    ap.add_argument("--threads", type=int, default=0, help="threads for every library (default: all cores)")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--cells", help="comma-separated subset of LSTM,GRU,RNN")
    ap.add_argument("--shapes", help="semicolon-separated T,B,I,H[,layers] shapes instead of the default "
                    "set (e.g. '25,4,1024,1024;100,1,64,128,2')")
    ap.add_argument("--no-step", action="store_true", help="skip the one-step-from-Python timing")
    ap.add_argument("--no-input-grad", action="store_true",
                    help="training steps on data: neither library computes the gradient of the input "
                    "(PyTorch: x without requires_grad; rnncore: backward(input_grad=False))")
    args = ap.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s.strip()]
        except ValueError:
            ap.error(f"--shapes: expected T,B,I,H groups separated by ';', got {args.shapes!r}")
        if not shapes or any(len(s) not in (4, 5) or min(s) < 1 for s in shapes):
            ap.error(f"--shapes: expected positive T,B,I,H[,layers] groups separated by ';', "
                     f"got {args.shapes!r}")
    cells = None
    if args.cells:
        cells = [c.strip().upper() for c in args.cells.split(",") if c.strip()]
        bad = [c for c in cells if c not in CELLS]
        if bad or not cells:
            ap.error(f"--cells: expected a subset of {','.join(CELLS)}, got {args.cells!r}")
    run(shapes, threads, train=not args.no_train, rss=not args.quick and not args.shapes,
        out_json=args.json, cells=cells, step=not args.no_step, input_grad=not args.no_input_grad)
    return 0


if __name__ == "__main__":
    sys.exit(main())
