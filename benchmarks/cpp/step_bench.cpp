// One streaming step at batch 1, one thread, fp32, through rnncore's C++ API (the default
// portable build with run-time ISA dispatch). Prints microseconds per step next to the
// figures of RTNeural's compile-time API (Eigen, -O3 -march=native) quoted in the speed issue.
//   cmake -S benchmarks/cpp -B build-bench -Drnncore_DIR=$(python -m rnncore --cmake-dir)
//   cmake --build build-bench && ./build-bench/step_bench
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "rnncore/rnncore.hpp"

using namespace rnncore;

static double bench(CellType cell, int64_t I, int64_t H) {
    LayerSpec s;
    s.cell = cell; s.input_size = I; s.hidden_size = H;
    std::mt19937 rng(0);
    std::uniform_real_distribution<float> u(-0.1f, 0.1f);
    const auto info = param_info(s);
    std::vector<std::vector<float>> store;
    std::vector<DirParams<float>> p(1);
    for (const auto& pi : info) {
        int64_t n = 1;
        for (auto d : pi.shape) n *= d;
        store.emplace_back(n);
        for (auto& v : store.back()) v = u(rng);
        const float* ptr = store.back().data();
        switch (pi.kind) {
            case W_IH: p[0].w_ih = ptr; break;
            case W_HH: p[0].w_hh = ptr; break;
            case B_IH: p[0].b_ih = ptr; break;
            case B_HH: p[0].b_hh = ptr; break;
            default: break;
        }
    }
    std::vector<float> x(I), h(H, 0.f), c(H, 0.f), y(H);
    for (auto& v : x) v = u(rng);
    const int warm = 2000, n = 20000;
    for (int i = 0; i < warm; ++i) stack_step<float>(s, p, 1, x.data(), h.data(), c.data(), y.data());
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < n; ++i) stack_step<float>(s, p, 1, x.data(), h.data(), c.data(), y.data());
        const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / n;
        if (us < best) best = us;
    }
    return best;
}

int main() {
    set_num_threads(1);
    std::printf("rnncore %s, isa %s, 1 thread, batch 1, fp32: microseconds per step (best of 5)\n",
                version(), isa_name().c_str());
    struct Case { const char* name; CellType cell; int64_t I, H; double rtneural; } cases[] = {
        {"LSTM", CellType::LSTM, 32, 64, 1.1}, {"GRU", CellType::GRU, 32, 64, 0.8},
        {"LSTM", CellType::LSTM, 128, 256, 19.0}, {"GRU", CellType::GRU, 128, 256, 13.0},
    };
    std::printf("%-5s %5s %5s %10s %10s %7s\n", "cell", "I", "H", "rnncore", "RTNeural", "ratio");
    for (const auto& k : cases) {
        const double t = bench(k.cell, k.I, k.H);
        std::printf("%-5s %5lld %5lld %10.3f %10.3f %7.2f\n", k.name, (long long)k.I, (long long)k.H, t, k.rtneural,
                    t / k.rtneural);
    }
    return 0;
}
