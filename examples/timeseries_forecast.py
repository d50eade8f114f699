"""Time-series forecasting (many-to-many regression): a GRU predicts the next value of a
noisy two-tone signal at every step, compared with the naive "tomorrow = today" forecast.
Run: python examples/timeseries_forecast.py   (RNNCORE_EXAMPLE_QUICK=1 for a smoke run)
"""
import os

import numpy as np

import rnncore as rc

QUICK = os.environ.get("RNNCORE_EXAMPLE_QUICK") == "1"
rng = np.random.default_rng(0)
t = np.arange(60_000) * 0.1
signal = np.sin(t) + 0.5 * np.sin(0.31 * t) + 0.1 * rng.standard_normal(t.size)
T = 50
n = (len(signal) - 1) // T
X = signal[:n * T].reshape(n, T, 1).astype(np.float32)
Y = signal[1:n * T + 1].reshape(n, T, 1).astype(np.float32)
split = int(0.8 * n)

model = rc.Sequential(rc.GRU(1, 32 if QUICK else 64, batch_first=True, seed=0),
                      rc.Dense(32 if QUICK else 64, 1, seed=0))
model.fit(X[:split], Y[:split], loss="mse", optimizer=rc.optim.Adam(lr=1e-2),
          epochs=3 if QUICK else 30, batch_size=32, validation_data=(X[split:], Y[split:]),
          progress=not QUICK, seed=0)
pred = model.predict(X[split:])
mse = float(((pred - Y[split:])[:, 5:] ** 2).mean())
naive = float(((X[split:] - Y[split:])[:, 5:] ** 2).mean())
print(f"test MSE {mse:.4f} vs naive forecast {naive:.4f} (noise floor {0.1 ** 2:.4f})")
