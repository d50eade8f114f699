"""Character-level text generation (one-to-many sampling after many-to-many training).

Trains a small LSTM language model on some of Python's own standard-library source with
truncated BPTT, then samples from it. About a minute on 2 cores.
Run: python examples/char_generation.py   (RNNCORE_EXAMPLE_QUICK=1 for a smoke run)
"""
import os

import numpy as np

import rnncore as rc
from rnncore.data import CharVocab, ascii_clean, default_corpus, windows

QUICK = os.environ.get("RNNCORE_EXAMPLE_QUICK") == "1"

text = ascii_clean(default_corpus(20_000 if QUICK else 250_000))
vocab = CharVocab.from_text(text)
X, Y = windows(vocab.encode(text), 128)

model = rc.Sequential(
    rc.Embedding(len(vocab), 48, seed=0),
    rc.LSTM(48, 64 if QUICK else 192, batch_first=True, seed=0),
    rc.Dense(64 if QUICK else 192, len(vocab), seed=0))
hist = model.fit(X, Y, optimizer=rc.optim.Adam(lr=3e-3), epochs=1 if QUICK else 2, batch_size=32,
                 bptt=64, clip_norm=5.0, progress=not QUICK, seed=0)
print("loss per epoch:", [round(v, 3) for v in hist.history["loss"]])
prime = "def "
out = model.generate(vocab.encode(prime), 200, temperature=0.7, seed=1)
print(prime + vocab.decode(out))
