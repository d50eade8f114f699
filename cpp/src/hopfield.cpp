// Hopfield networks: Hebbian and Storkey storage, asynchronous and synchronous recall.
#include <cstring>
#include <stdexcept>
#include <vector>

#include "rnncore/classic.hpp"

namespace rnncore {

namespace {
// splitmix64: small, fast, and the same on every platform (recall orders are reproducible).
struct SplitMix {
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
};

double field(int64_t n, const double* Wi, const double* s) {
    double f = 0;
    for (int64_t j = 0; j < n; ++j) f += Wi[j] * s[j];
    return f;
}
}  // namespace

void hopfield_store(int64_t n, double* W, const double* X, int64_t P, HopfieldRule rule) {
    if (n < 1 || P < 0) throw std::invalid_argument("hopfield_store: n >= 1 and P >= 0 expected");
    const double inv = 1.0 / (double)n;
    if (rule == HopfieldRule::HEBBIAN) {
        // W += X^T X / n, one GEMM over all patterns
        if (P > 0) gemm<double>(true, false, n, n, P, inv, X, n, X, n, 1.0, W, n);
        for (int64_t i = 0; i < n; ++i) W[i * n + i] = 0.0;
        return;
    }
    if (rule != HopfieldRule::STORKEY) throw std::invalid_argument("rule: expected hebbian or storkey");
    std::vector<double> h(n);
    for (int64_t p = 0; p < P; ++p) {
        const double* x = X + p * n;
        // local fields from the weights before this pattern: h_i = sum_k w_ik x_k
        for (int64_t i = 0; i < n; ++i) h[i] = field(n, W + i * n, x);
        // w_ij += (x_i x_j - x_i h_ji - h_ij x_j) / n,
        // h_ij = sum_{k != i, j} w_ik x_k = h_i - w_ii x_i - w_ij x_j (w_ii = 0)
        for (int64_t i = 0; i < n; ++i) {
            double* Wi = W + i * n;
            for (int64_t j = i + 1; j < n; ++j) {
                const double wij = Wi[j];
                const double hij = h[i] - W[i * n + i] * x[i] - wij * x[j];
                const double hji = h[j] - W[j * n + j] * x[j] - wij * x[i];
                const double d = (x[i] * x[j] - x[i] * hji - hij * x[j]) * inv;
                Wi[j] = wij + d;
            }
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = i + 1; j < n; ++j) W[j * n + i] = W[i * n + j];
        for (int64_t i = 0; i < n; ++i) W[i * n + i] = 0.0;
    }
}

int64_t hopfield_recall(int64_t n, const double* W, double* s, HopfieldMode mode, int64_t max_iter,
                        uint64_t seed, bool* converged) {
    if (n < 1 || max_iter < 1) throw std::invalid_argument("hopfield_recall: n >= 1 and max_iter >= 1 expected");
    *converged = false;
    if (mode == HopfieldMode::ASYNC) {
        SplitMix rng{seed};
        std::vector<int64_t> order(n);
        for (int64_t i = 0; i < n; ++i) order[i] = i;
        for (int64_t it = 1; it <= max_iter; ++it) {
            for (int64_t i = n - 1; i > 0; --i) {       // Fisher-Yates
                const int64_t j = (int64_t)(rng.next() % (uint64_t)(i + 1));
                std::swap(order[i], order[j]);
            }
            bool changed = false;
            for (int64_t q = 0; q < n; ++q) {
                const int64_t i = order[q];
                const double f = field(n, W + i * n, s);
                const double v = f > 0 ? 1.0 : f < 0 ? -1.0 : s[i];
                if (v != s[i]) { s[i] = v; changed = true; }
            }
            if (!changed) { *converged = true; return it; }
        }
        return max_iter;
    }
    if (mode != HopfieldMode::SYNC) throw std::invalid_argument("mode: expected async or sync");
    std::vector<double> next(n);
    for (int64_t it = 1; it <= max_iter; ++it) {
        bool changed = false;
        for (int64_t i = 0; i < n; ++i) {
            const double f = field(n, W + i * n, s);
            next[i] = f > 0 ? 1.0 : f < 0 ? -1.0 : s[i];
            changed |= next[i] != s[i];
        }
        std::memcpy(s, next.data(), sizeof(double) * n);
        if (!changed) { *converged = true; return it; }
    }
    return max_iter;
}

double hopfield_energy(int64_t n, const double* W, const double* s) {
    double e = 0;
    for (int64_t i = 0; i < n; ++i) e += s[i] * field(n, W + i * n, s);
    return -0.5 * e;
}

}  // namespace rnncore
