"""The exchange pages: a recurrence team of two passes h from step to step through the
candidate page (or two) with the shortest measured round trips between its threads, the ring of
inference and the states of training (recorded in the layer's buffer for the backward too). The
first call that needs them measures (and runs without them), later calls use them; results are
bit for bit those without them and PyTorch's in float64 (outputs, final states, and in training
the input and weight gradients), and two calls at once do not share the pages. Each test runs
in a fresh process, where nothing is measured."""
import json

import pytest

import rnncore
from conftest import run_child

CHILD = r"""
import json, sys, threading
import numpy as np
import rnncore
from rnncore import _core
_core.set_isa(ISA)
rnncore.set_num_threads(2)
out = {"before": _core.exchange_status()}
rng = np.random.default_rng(5)
checks = []
import torch
for cell, dtype, B, H, bidir, train in CASES:
    I, T = 40, 12
    layer = getattr(rnncore, cell)(I, H, bidirectional=bidir, seed=2, dtype=dtype)
    layer.train() if train else layer.eval()
    D = 2 if bidir else 1
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = (0.5 * rng.standard_normal((D, B, H))).astype(dtype)
    st = (h0, h0[::-1].copy()) if cell == "LSTM" else h0
    dy = rng.standard_normal((T, B, D * H)).astype(dtype)
    def call():
        y, s = layer.forward(x, st) if train else layer(x, st)
        s = s if isinstance(s, tuple) else (s,)
        out = [np.array(y)] + [np.array(a) for a in s]
        if train:
            layer.zero_grad()
            dx = layer.backward(dy)
            out += [np.array(dx[0] if isinstance(dx, tuple) else dx)]
            out += [np.array(layer.grads[k]) for k in sorted(layer.grads)]
        return out
    uses0 = _core.exchange_status()["uses"]
    first = call()                    # the measuring call (or the pages, once measured)
    runs = [call() for _ in range(3)]
    used = _core.exchange_status()["uses"] - uses0
    same = all(all(np.array_equal(a, b) for a, b in zip(first, r)) for r in runs)
    # the reference: PyTorch in float64
    tl = getattr(torch.nn, cell)(I, H, bidirectional=bidir).double()
    tl.load_state_dict({k: torch.from_numpy(np.array(v, np.float64)) for k, v in layer.params.items()})
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    stt = tuple(torch.from_numpy(s.astype(np.float64)) for s in st) if cell == "LSTM" else torch.from_numpy(h0.astype(np.float64))
    yt, ht = tl(xt, stt)
    want = [yt.detach().numpy()] + [a.detach().numpy() for a in (ht if cell == "LSTM" else (ht,))]
    if train:
        yt.backward(torch.from_numpy(dy.astype(np.float64)))
        names = sorted(layer.grads)
        tg = dict(tl.named_parameters())
        want += [xt.grad.numpy()] + [tg[k].grad.numpy() for k in names]
    err = max(float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max()))) for a, b in zip(runs[-1], want))
    checks.append({"case": [cell, dtype, B, H, bidir, train], "used": int(used), "same": bool(same), "err": err,
                   "n": len(want)})
out["checks"] = checks
# two calls at once (the GIL released in the kernels): each result bit for bit its own alone
layers = [rnncore.GRU(40, 256, seed=s) for s in (7, 8)]
xs = [rng.standard_normal((30, 1, 40)).astype(np.float32) for _ in layers]
for l in layers:
    l.eval()
alone = [l(x)[0] for l, x in zip(layers, xs)]
bad = []
def worker(i):
    for _ in range(40):
        if not np.array_equal(layers[i](xs[i])[0], alone[i]):
            bad.append(i)
ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
for t in ts: t.start()
for t in ts: t.join()
out["concurrent_bad"] = len(bad)
out["after"] = _core.exchange_status()
print("RESULT" + json.dumps(out))
"""

# (cell, dtype, B, H, bidirectional, training): B * H floats of 1 KiB put both slots in one
# page, 4 KiB one in each of two; at inference a bidirectional layer's directions run at once
# here, a thread each (no team, no pages), in training one after the other
CASES = [("RNN", "float32", 1, 256, False, False), ("LSTM", "float32", 1, 256, False, False),
         ("GRU", "float32", 2, 256, False, False), ("LSTM", "float64", 1, 256, False, False),
         ("RNN", "float32", 4, 256, False, False), ("GRU", "float64", 1, 256, False, False),
         ("LSTM", "float32", 1, 256, True, False),
         ("RNN", "float32", 1, 256, False, True), ("LSTM", "float32", 4, 256, True, True),
         ("GRU", "float64", 2, 256, True, True)]


def _run(isa):
    code = CHILD.replace("ISA", repr(isa)).replace("CASES", repr(CASES))
    # the L2 the kernels plan for pinned at 2 MiB: which teams take the split-phase product (and
    # so the pages) depends on it (a float64 LSTM H=256's 1 MiB slices: split within 3/4 of 2 MiB,
    # one sweep after a full barrier with a 1 MiB L2)
    r = run_child(code, timeout=300, env={"RNNCORE_L2_BYTES": str(2 << 20)})
    assert r.returncode == 0, r.stderr[-3000:]
    line = [s for s in r.stdout.splitlines() if s.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("isa", rnncore._core.available_isas().split(","))
def test_exchange_pages_exact_and_measured_once(isa):
    pytest.importorskip("torch")
    out = _run(isa)
    assert out["before"]["state"] == "unmeasured"
    after = out["after"]
    assert after["state"] == "measured"
    cand = after["round_trip_ns"]
    assert len(cand) == 64 and all(c > 0 for c in cand)
    a, b = after["chosen"]
    assert a != b and cand[a] == min(cand) and cand[b] == sorted(cand)[1]
    for c in out["checks"]:
        cell, dtype, B, H, bidir, train = c["case"]
        tol = (2e-5 if train else 2e-6) if dtype == "float32" else 1e-12
        assert c["err"] < tol, c
        assert c["same"], c      # the measuring call, the pages and the layer's buffer agree bit for bit
        assert c["n"] == (3 if cell == "LSTM" else 2) + (1 + 4 * (2 if bidir else 1) if train else 0), c
    # the first call measured; every later forward of a team of two passed h through the pages
    # (a training step's directions one after the other: each)
    assert out["checks"][0]["used"] == 3, out["checks"][0]
    for c in out["checks"][1:]:
        bidir, train = c["case"][4:]
        if train or not bidir:
            assert c["used"] == 4 * (2 if bidir else 1), c
    assert out["concurrent_bad"] == 0
