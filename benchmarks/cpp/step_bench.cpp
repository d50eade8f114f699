// One streaming step at batch 1, fp32, through rnncore's C++ API (Model::step, the default
// portable build with run-time ISA dispatch), one thread against, in the same run, the same
// step written with Eigen fixed-size matrices the way RTNeural's compile-time API computes it
// (eigen_ref.cpp, -O3, -march=native with EIGEN_REF_NATIVE=ON as run.sh sets; built when
// Eigen 3 is found), and next to the RTNeural figures quoted in the speed issue; then rnncore
// with every core (a step of a large layer splits its hidden units over the threads), and
// last a step of several batch rows with every core.
//   bash benchmarks/cpp/run.sh      (saves the layers from Python, builds, runs)
// Arguments: MODEL_FILE:lstm|gru:I:H:QUOTED_US ... (QUOTED_US 0: none quoted)
#include <chrono>
#include <thread>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "rnncore/model.hpp"
#include "rnncore/runtime.hpp"
#ifdef RNNCORE_BENCH_EIGEN
#include "eigen_ref.hpp"
#endif

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODEL_FILE:lstm|gru:I:H:QUOTED_US ...\n", argv[0]);
        return 2;
    }
    const int all = (int)std::thread::hardware_concurrency() > 1 ? (int)std::thread::hardware_concurrency() : 1;
    const int warm = 2000, n = 20000, reps = 7;
    // Microseconds per call of step(): the best of `reps` runs of `steps` calls, after a warm-up.
    auto best_us = [&](int steps, auto&& step) {
        for (int i = 0; i < std::min(warm, steps); ++i) step();
        double b = 1e30;
        for (int rep = 0; rep < reps; ++rep) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int i = 0; i < steps; ++i) step();
            const double us =
                std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / steps;
            if (us < b) b = us;
        }
        return b;
    };
    std::printf("rnncore %s, isa %s, batch 1, fp32: microseconds per step (best of %d x %d)\n",
                rnncore::version(), rnncore::isa_name().c_str(), reps, n);
    std::printf("%-22s %9s %13s %7s %14s %7s %11s\n", "model", "rnncore", "Eigen (same", "ratio",
                "RTNeural", "ratio", "rnncore");
    std::printf("%-22s %9s %13s %7s %14s %7s %8d thr\n", "", "1 thread", "run, native)", "", "(quoted)", "", all);
    std::vector<rnncore::Model> models;
    std::vector<std::string> names;
    std::vector<long> sizes;
    for (int a = 1; a < argc; ++a) {
        const std::string arg = argv[a];
        std::vector<std::string> f;
        size_t p0 = 0;
        for (size_t p; (p = arg.find(':', p0)) != std::string::npos; p0 = p + 1) f.push_back(arg.substr(p0, p - p0));
        f.push_back(arg.substr(p0));
        if (f.size() != 5) {
            std::fprintf(stderr, "bad argument %s: expected MODEL_FILE:lstm|gru:I:H:QUOTED_US\n", arg.c_str());
            return 2;
        }
        const bool lstm = f[1] == "lstm";
        const int in = std::atoi(f[2].c_str()), hid = std::atoi(f[3].c_str());
        const double quoted = std::atof(f[4].c_str());
        rnncore::Model m = rnncore::Model::load(f[0]);
        auto st = m.new_state(1);
        std::vector<float> x(m.input_size(), 0.1f), y(m.output_size());
        // fewer steps for large layers (about 2 s at most per timing)
        const int steps = (int)std::max<long>(200, std::min<long>(n, 4000000000L / ((long)(in + hid) * hid * 4 * 8)));
        auto time_steps = [&](int threads) {
            rnncore::set_num_threads(threads);
            return best_us(steps, [&] { m.step(x.data(), st, y.data()); });
        };
        const double best = time_steps(1);
        const double best_all = time_steps(all);
        double eig = -1.0;
#ifdef RNNCORE_BENCH_EIGEN
        eig = eigen_step_us(lstm, in, hid, warm, n, reps);
#endif
        const std::string name = f[0].substr(f[0].find_last_of('/') + 1);
        char eb[32] = "-", er[32] = "-", qb[32] = "-", qr[32] = "-";
        if (eig > 0) {
            std::snprintf(eb, sizeof eb, "%.3f", eig);
            std::snprintf(er, sizeof er, "%.2f", best / eig);
        }
        if (quoted > 0) {
            std::snprintf(qb, sizeof qb, "%.3f", quoted);
            std::snprintf(qr, sizeof qr, "%.2f", best / quoted);
        }
        std::printf("%-22s %9.3f %13s %7s %14s %7s %11.3f\n", name.c_str(), best, eb, er, qb, qr, best_all);
        models.push_back(std::move(m));
        names.push_back(name);
        sizes.push_back((long)(in + hid) * hid * 4);
    }
    // Several batch rows a step, every core: the fused blocks take up to three rows a pass
    // (AVX-512; one on AVX2, where from four rows the row-major weights are read instead).
    const int batches[] = {1, 2, 3, 4, 8, 16};
    rnncore::set_num_threads(all);
    std::printf("\nbatch rows a step, %d threads: microseconds per step\n%-22s", all, "model");
    for (int B : batches) std::printf(" %8s%-2d", "B=", B);
    std::printf("\n");
    for (size_t i = 0; i < models.size(); ++i) {
        std::printf("%-22s", names[i].c_str());
        for (int B : batches) {
            rnncore::Model& m = models[i];
            auto st = m.new_state(B);
            std::vector<float> x((size_t)B * m.input_size(), 0.1f), y((size_t)B * m.output_size());
            const int steps = (int)std::max<long>(100, std::min<long>(n / 4, 1000000000L / (sizes[i] * 2 * B)));
            std::printf(" %10.2f", best_us(steps, [&] { m.step(x.data(), st, y.data()); }));
        }
        std::printf("\n");
    }
    return 0;
}
