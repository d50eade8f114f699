"""Why LSTM exists: the gradient of the last output with respect to an input k steps
earlier, for a vanilla (tanh) RNN and an LSTM of the same size. The RNN's gradient decays
exponentially with the lag (vanishing gradients) while the LSTM's cell state carries it
much further. Saved as a plot when matplotlib is installed, printed as a table always.
Run: python examples/vanishing_gradients.py   (RNNCORE_EXAMPLE_QUICK=1 for a smoke run)
"""
import os

import numpy as np

import rnncore as rc

QUICK = os.environ.get("RNNCORE_EXAMPLE_QUICK") == "1"
T, I, H, trials = 100, 8, 64, 3 if QUICK else 20
lags = [1, 2, 5, 10, 20, 40, 60, 80, 99]


def grad_norms(layer, rng):
    norms = np.zeros(T)
    for _ in range(trials):
        x = rng.standard_normal((T, 1, I))
        y, _ = layer.forward(x)
        dy = np.zeros_like(y)
        dy[-1] = rng.standard_normal(y.shape[-1])        # a loss on the last output only
        dx, _ = layer.backward(dy)
        norms += np.linalg.norm(dx[:, 0, :], axis=1)
    layer.zero_grad()
    return norms / trials


rng = np.random.default_rng(0)
rnn = grad_norms(rc.RNN(I, H, dtype="float64", seed=0), rng)
lstm = grad_norms(rc.LSTM(I, H, dtype="float64", seed=0), rng)
# an LSTM whose forget gates start open (bias +3), as commonly initialised in practice
open_lstm = rc.LSTM(I, H, dtype="float64", seed=0)
for k in ("bias_ih_l0", "bias_hh_l0"):
    b = open_lstm.params[k].copy()
    b[H:2 * H] += 1.5
    open_lstm.params[k] = b
lstm_open = grad_norms(open_lstm, rng)

print(f"|d y_T / d x_(T-k)| averaged over {trials} random sequences (T={T}, H={H})")
print(f"{'lag k':>6} {'RNN':>12} {'LSTM':>12} {'LSTM, open forget gate':>24}")
for k in lags:
    i = T - 1 - k
    print(f"{k:6d} {rnn[i]:12.3e} {lstm[i]:12.3e} {lstm_open[i]:24.3e}")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = np.arange(T)[::-1]
    plt.semilogy(ks, rnn, label="RNN (tanh)")
    plt.semilogy(ks, lstm, label="LSTM")
    plt.semilogy(ks, lstm_open, label="LSTM, forget bias +3")
    plt.xlabel("time lag k")
    plt.ylabel("gradient norm")
    plt.legend()
    plt.title("Vanishing gradients")
    plt.savefig("vanishing_gradients.png", dpi=120)
    print("saved vanishing_gradients.png")
except ImportError:
    print("(install matplotlib for a plot)")
