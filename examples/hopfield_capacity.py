"""Hopfield networks: how many random patterns can be stored and recalled exactly from
probes with 5% of their bits flipped, with the Hebbian rule and with Storkey's rule.
Run: python examples/hopfield_capacity.py   (RNNCORE_EXAMPLE_QUICK=1 for a smoke run)
"""
import os

import numpy as np

import rnncore as rc

QUICK = os.environ.get("RNNCORE_EXAMPLE_QUICK") == "1"
n = 64 if QUICK else 128
trials = 2 if QUICK else 5


def recalled_fraction(rule, p, rng):
    ok = total = 0
    for _ in range(trials):
        P = rng.choice([-1.0, 1.0], (p, n))
        net = rc.Hopfield(n).store(P, rule=rule)
        for q in P:
            probe = q.copy()
            probe[rng.choice(n, n // 20, replace=False)] *= -1
            ok += np.array_equal(net.recall(probe, seed=0), q)
            total += 1
    return ok / total


print(f"{n} units; fraction of patterns recalled exactly from 5%-corrupted probes")
print(f"{'patterns':>8} {'load':>6} {'hebbian':>8} {'storkey':>8}")
caps = {"hebbian": 0, "storkey": 0}
for p in range(2, int(0.4 * n), max(1, n // 32)):
    row = {rule: recalled_fraction(rule, p, np.random.default_rng(p)) for rule in caps}
    for rule, frac in row.items():
        if frac == 1.0 and caps[rule] == p - max(1, n // 32) or (frac == 1.0 and caps[rule] == 0):
            caps[rule] = p
    print(f"{p:8d} {p / n:6.3f} {row['hebbian']:8.2f} {row['storkey']:8.2f}")
print(f"largest load with perfect recall: hebbian {caps['hebbian'] / n:.3f} n, storkey {caps['storkey'] / n:.3f} n")
