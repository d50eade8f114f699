"""Before/after timing of a change in ONE process: the installed rnncore against an older build
loaded beside it as `rnncore_old`, in alternating rounds. On a shared machine whose speed drifts
by 10% within minutes, the per-round ratio new/old is far steadier than timing the two builds
in alternating processes (benchmarks/RESULTS.md, session 18).

    python benchmarks/ab.py --build HEAD                 # build a commit as the old side (once)
    pip install --no-build-isolation --no-deps .         # the working tree as the new side
    python benchmarks/ab.py LSTM 16 100 256 128          # CELL B T H I: training step
    python benchmarks/ab.py GRU 64 100 512 256 --rounds 5 --secs 2 --phases
    python benchmarks/ab.py RNN 1 100 256 128 --infer
    python benchmarks/ab.py LSTM 1 100 64 32 --infer --layers 2   # a stack of two layers
    python benchmarks/ab.py GRU 16 100 128 64 --layers 2 --dropout 0.2   # training, dropout between

--build REV checks REV out in a temporary worktree and installs it into DIR/rnncore_old
(--dir, default /tmp/rnncore-ab), compiled with -DPYBIND11_COMPILER_TYPE="_old": its own
pybind11 type registry, so both extension modules load in one interpreter. It needs git and
the build requirements installed (pip install scikit-build-core pybind11 numpy). With --phases
the kernels' phase timers are on (RNNCORE_PHASES=1) and each phase's per-round ratio is printed.

Two builds of the same source need not time alike: on the Zen 4 machine of sessions 33-34 the
same commit on both sides gave new/old 0.90-0.96 (LSTM T=25 B=1 I=H=1024), the code laid out
elsewhere. Time the same commit on both sides first; below about 10% switch the change inside
one build instead (an experiment-only environment variable read per call, alternating rounds in
one process: benchmarks/RESULTS.md, session 34).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def build(rev, out_dir):
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True,
                          text=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="rnncore-ab-src-")
    target = tempfile.mkdtemp(prefix="rnncore-ab-pkg-")
    try:
        subprocess.run(["git", "-C", root, "worktree", "add", "--detach", work, rev], check=True)
        env = dict(os.environ, CXXFLAGS=os.environ.get("CXXFLAGS", "") + ' -DPYBIND11_COMPILER_TYPE=\\"_old\\"')
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                        "--target", target, "."], cwd=work, env=env, check=True)
        dest = os.path.join(out_dir, "rnncore_old")
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(out_dir, exist_ok=True)
        shutil.copytree(os.path.join(target, "rnncore"), dest)
        print(f"built {rev} into {dest}")
    finally:
        subprocess.run(["git", "-C", root, "worktree", "remove", "--force", work], check=False)
        subprocess.run(["git", "-C", root, "worktree", "prune"], check=False)
        shutil.rmtree(target, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", nargs="*", help="CELL B T H I")
    ap.add_argument("--build", metavar="REV", help="build REV as the old side and exit")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "rnncore-ab"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--secs", type=float, default=1.0, help="seconds of calls per build and round")
    ap.add_argument("--infer", action="store_true", help="time inference (forward) instead of training")
    ap.add_argument("--phases", action="store_true", help="the kernels' phase times per round")
    ap.add_argument("--layers", type=int, default=1, help="layers of the stack (num_layers)")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout between the layers (training)")
    a = ap.parse_args()
    if a.build:
        build(a.build, a.dir)
        return
    if len(a.shape) != 5:
        ap.error("expected CELL B T H I (or --build REV)")
    if a.phases and os.environ.get("RNNCORE_PHASES") != "1":   # read once at import
        env = dict(os.environ, RNNCORE_PHASES="1")
        sys.exit(subprocess.call([sys.executable, __file__, *sys.argv[1:]], env=env))
    cell, (B, T, H, I) = a.shape[0].upper(), map(int, a.shape[1:])
    if not os.path.isdir(os.path.join(a.dir, "rnncore_old")):
        sys.exit(f"no old build in {a.dir}: run with --build REV first")
    sys.path.insert(0, a.dir)
    import rnncore
    import rnncore_old
    mods = {"old": rnncore_old, "new": rnncore}
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    dy = np.ones((T, B, H), np.float32)
    layers = {}
    for name, mod in mods.items():
        layer = getattr(mod, cell)(I, H, num_layers=a.layers, dropout=a.dropout, seed=0)
        layer.eval() if a.infer else layer.train()
        layers[name] = layer

    def call(layer):
        if a.infer:      # a call: inference (forward() keeps the activations for backward)
            layer(x)
            return
        layer.forward(x)
        layer.backward(dy)

    for layer in layers.values():
        call(layer)
        call(layer)
    times = {"old": [], "new": []}
    phases = {"old": {}, "new": {}}
    for mod in mods.values():
        mod._core.phase_times(True)
    for r in range(a.rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            ts = []
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < a.secs:
                t = time.perf_counter()
                call(layers[name])
                ts.append(time.perf_counter() - t)
            times[name].append(np.median(ts) * 1e3)
            for k, v in mods[name]._core.phase_times(True).items():
                if v:
                    phases[name].setdefault(k, []).append(v[0] / len(ts) * 1e3)
    o, n = np.array(times["old"]), np.array(times["new"])
    q = n / o
    stack = (f" L={a.layers}" if a.layers > 1 else "") + (f" dropout={a.dropout}" if a.dropout else "")
    print(f"{cell} T={T} B={B} I={I} H={H}{stack} {'inference' if a.infer else 'training'}, {a.rounds} rounds (ms): "
          f"old {np.median(o):.3f} [{o.min():.3f}-{o.max():.3f}]  new {np.median(n):.3f} [{n.min():.3f}-{n.max():.3f}]  "
          f"new/old {np.median(q):.3f} [{q.min():.3f}-{q.max():.3f}]")
    for k in phases["new"]:
        if k in phases["old"]:
            po, pn = np.array(phases["old"][k]), np.array(phases["new"][k])
            if max(po.max(), pn.max()) > 0.005:
                pq = pn / np.maximum(po, 1e-12)
                print(f"  {k:24s} old {np.median(po):8.3f}  new {np.median(pn):8.3f}  "
                      f"new/old {np.median(pq):.3f} [{pq.min():.3f}-{pq.max():.3f}]")


if __name__ == "__main__":
    main()
