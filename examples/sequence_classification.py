"""Sequence classification (many-to-one): the parity of a bit string, read one bit per
step by an LSTM whose last valid step (LastStep honours lengths) feeds a Dense classifier.
Training strings have lengths 1..8; half of the 8-bit strings are held out for testing.
Run: python examples/sequence_classification.py   (RNNCORE_EXAMPLE_QUICK=1 for a smoke run)
"""
import os

import numpy as np

import rnncore as rc

QUICK = os.environ.get("RNNCORE_EXAMPLE_QUICK") == "1"
rng = np.random.default_rng(0)
all8 = (np.arange(256)[:, None] >> np.arange(8)[None, ::-1]) & 1
held = rng.permutation(256)[:128]
held_set = {tuple(r) for r in all8[held]}
n = 3000
L = rng.integers(1, 9, n)
B = rng.integers(0, 2, (n, 8))
B[np.arange(8)[None, :] >= L[:, None]] = 0
keep = np.array([not (l == 8 and tuple(b) in held_set) for b, l in zip(B, L)])
X = (2 * B[keep] - 1).astype(np.float32)[..., None]
Y = B[keep].sum(1) % 2
Xt = (2 * all8[held] - 1).astype(np.float32)[..., None]
Yt = all8[held].sum(1) % 2

model = rc.Sequential(rc.LSTM(1, 32, batch_first=True, seed=0), rc.LastStep(), rc.Dense(32, 2, seed=0))
model.fit(X, Y, lengths=L[keep], optimizer=rc.optim.Adam(lr=0.01), epochs=3 if QUICK else 15,
          batch_size=32, validation_data=(Xt, Yt), progress=not QUICK, seed=0)
print("held-out 8-bit parity accuracy:", model.evaluate(Xt, Yt)["accuracy"])
