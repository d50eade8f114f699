"""The `rnncore` command line (also `python -m rnncore`): train, sample, bench, info."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_MODEL = "char-lstm.rnnc"


def _cmd_info(args) -> int:
    from . import info
    for k, v in info().items():
        print(f"{k:14s} {v}")
    return 0


def _fail(msg) -> int:
    print(f"rnncore: error: {msg}", file=sys.stderr)
    return 2


def _cmd_train(args) -> int:
    import numpy as np

    import rnncore as rc
    from .data import CharVocab, ascii_clean, default_corpus, windows

    if args.data is not None:
        if not os.path.isfile(args.data):
            return _fail(f"--data {args.data}: no such file")
        with open(args.data, encoding="utf-8", errors="replace") as f:
            text = f.read(args.max_chars) if args.max_chars else f.read()
        if not text.strip():
            return _fail(f"--data {args.data}: the file is empty")
        source = args.data
    else:
        text = default_corpus(args.max_chars)
        source = "the Python standard library's source (embedded default corpus)"
    text = ascii_clean(text)
    if len(text) < args.seq_len + 1:
        return _fail(f"--data: expected at least {args.seq_len + 1} characters of text, got {len(text)}")
    vocab = CharVocab.from_text(text)
    ids = vocab.encode(text)
    X, Y = windows(ids, args.seq_len)
    n_val = max(1, len(X) // 20) if len(X) >= 20 else 0
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(X))
    Xv, Yv = X[perm[:n_val]], Y[perm[:n_val]]
    Xt, Yt = X[perm[n_val:]], Y[perm[n_val:]]
    if args.threads:
        rc.set_num_threads(args.threads)
    V = len(vocab)
    model = rc.Sequential(
        rc.Embedding(V, args.embed, seed=args.seed),
        rc.LSTM(args.embed, args.hidden, num_layers=args.layers, batch_first=True, seed=args.seed),
        rc.Dense(args.hidden, V, seed=args.seed))
    model.metadata = {"chars": vocab.chars, "kind": "char-lm"}
    print(f"rnncore {rc.__version__} ({rc.info()['isa']}, {rc.get_num_threads()} threads): training a "
          f"character-level LSTM (embed {args.embed}, hidden {args.hidden}, layers {args.layers}) on "
          f"{len(text):,} characters of {source}; vocabulary {V}, {len(Xt)} sequences of "
          f"{args.seq_len}, truncated BPTT every {args.bptt} steps.", flush=True)
    opt = rc.optim.Adam(lr=args.lr)
    prime = vocab.encode(args.prime)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        hist = model.fit(Xt, Yt, optimizer=opt, epochs=1, batch_size=args.batch_size, bptt=args.bptt,
                         clip_norm=5.0, validation_data=(Xv, Yv) if n_val else None,
                         progress=not args.no_progress, seed=args.seed + epoch)
        logs = {k: round(v[-1], 4) for k, v in hist.history.items()}
        sample = vocab.decode(model.generate(prime, args.sample_length, temperature=0.7,
                                             seed=args.seed + epoch))
        print(f"epoch {epoch + 1}/{args.epochs} {json.dumps(logs)} ({time.perf_counter() - t0:.0f} s)")
        print("---- sample ----\n" + args.prime + sample + "\n----------------", flush=True)
        model.save(args.out)
    print(f"saved {args.out}; try: rnncore sample --model {args.out} --prime 'def '")
    return 0


def _cmd_sample(args) -> int:
    import rnncore as rc
    from .data import CharVocab

    if not os.path.isfile(args.model):
        return _fail(f"--model {args.model}: no such file (train one with: rnncore train)")
    try:
        model = rc.load(args.model)
    except ValueError as e:
        return _fail(str(e))
    meta = getattr(model, "metadata", None) or {}
    if "chars" not in meta:
        return _fail(f"{args.model}: not a character-level model (no vocabulary in its metadata)")
    if args.temperature < 0:
        return _fail(f"--temperature: expected >= 0, got {args.temperature}")
    vocab = CharVocab(meta["chars"])
    prime = args.prime or "\n"
    out = model.generate(vocab.encode(prime), args.length, temperature=args.temperature, seed=args.seed)
    print(prime + vocab.decode(out))
    return 0


def _cmd_bench(args) -> int:
    from .bench import main as bench_main
    argv = [] if args.full else ["--quick"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    for flag, value in (("--cells", args.cells), ("--shapes", args.shapes)):
        if value:
            argv += [flag, value]
    if args.no_train:
        argv.append("--no-train")
    if args.no_step:
        argv.append("--no-step")
    if args.no_input_grad:
        argv.append("--no-input-grad")
    if args.json:
        argv += ["--json", args.json]
    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnncore", description="Fast RNN, LSTM and GRU for the CPU.")
    p.add_argument("--cmake-dir", action="store_true",
                   help="print the folder of rnncore's CMake package (for find_package(rnncore)) and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("train", help="train a character-level LSTM (default: on Python's own source)",
                       description="Train a character-level LSTM language model. With no --data it "
                                   "trains on the source text of Python's standard library.")
    s.add_argument("--data", help="a UTF-8 text file to train on (default: the embedded corpus)")
    s.add_argument("--out", default=DEFAULT_MODEL, help=f"where to save the model (default {DEFAULT_MODEL})")
    s.add_argument("--max-chars", type=int, default=600_000, help="characters of text to use (default 600000)")
    s.add_argument("--epochs", type=int, default=4)
    s.add_argument("--hidden", type=int, default=256)
    s.add_argument("--embed", type=int, default=64)
    s.add_argument("--layers", type=int, default=1)
    s.add_argument("--seq-len", type=int, default=128, help="characters per training sequence")
    s.add_argument("--bptt", type=int, default=64, help="truncated BPTT chunk length")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=0, help="kernel threads (default: all cores)")
    s.add_argument("--prime", default="def ", help="text that starts each printed sample")
    s.add_argument("--sample-length", type=int, default=300)
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="generate text from a saved character-level model")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--prime", default="def ")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--length", type=int, default=500)
    s.add_argument("--seed", type=int, default=None)
    s.set_defaults(func=_cmd_sample)

    s = sub.add_parser("bench", help="a short benchmark against NumPy, PyTorch and ONNX Runtime when installed")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--full", action="store_true", help="every shape of benchmarks/run.py (slow)")
    s.add_argument("--cells", help="comma-separated subset of LSTM,GRU,RNN")
    s.add_argument("--shapes", help="semicolon-separated T,B,I,H shapes, e.g. '25,4,1024,1024'")
    s.add_argument("--no-train", action="store_true", help="inference only")
    s.add_argument("--no-step", action="store_true", help="skip the one-step-from-Python timing")
    s.add_argument("--no-input-grad", action="store_true",
                   help="training steps on data: no gradient of the input in either library")
    s.add_argument("--json", help="also write the results to this file")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("info", help="version, SIMD level in use, threads, BLAS, CUDA")
    s.set_defaults(func=_cmd_info)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.cmake_dir:
        from . import get_cmake_dir
        print(get_cmake_dir())
        return 0
    if not getattr(args, "func", None):
        p.print_help()
        return 2
    for name in ("epochs", "hidden", "embed", "layers", "seq_len", "bptt", "batch_size", "length",
                 "sample_length"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            return _fail(f"--{name.replace('_', '-')}: expected a positive integer, got {v}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
