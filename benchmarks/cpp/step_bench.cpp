// One streaming step at batch 1, one thread, fp32, through rnncore's C++ API (Model::step,
// the default portable build with run-time ISA dispatch), against, in the same run, the same
// step written with Eigen fixed-size matrices the way RTNeural's compile-time API computes it
// (eigen_ref.cpp, -O3, -march=native with EIGEN_REF_NATIVE=ON as run.sh sets; built when Eigen 3 is found), and next to the RTNeural
// figures quoted in the speed issue.
//   bash benchmarks/cpp/run.sh      (saves the layers from Python, builds, runs)
// Arguments: MODEL_FILE:lstm|gru:I:H:QUOTED_US ...
#include <chrono>
#include <cstdio>
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
    rnncore::set_num_threads(1);
    const int warm = 2000, n = 20000, reps = 7;
    std::printf("rnncore %s, isa %s, 1 thread, batch 1, fp32: microseconds per step (best of %d x %d)\n",
                rnncore::version(), rnncore::isa_name().c_str(), reps, n);
    std::printf("%-22s %9s %13s %7s %14s %7s\n", "model", "rnncore", "Eigen (same", "ratio",
                "RTNeural", "ratio");
    std::printf("%-22s %9s %13s %7s %14s %7s\n", "", "", "run, native)", "", "(quoted)", "");
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
        for (int i = 0; i < warm; ++i) m.step(x.data(), st, y.data());
        double best = 1e30;
        for (int rep = 0; rep < reps; ++rep) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int i = 0; i < n; ++i) m.step(x.data(), st, y.data());
            const double us =
                std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / n;
            if (us < best) best = us;
        }
        double eig = -1.0;
#ifdef RNNCORE_BENCH_EIGEN
        eig = eigen_step_us(lstm, in, hid, warm, n, reps);
#endif
        const std::string name = f[0].substr(f[0].find_last_of('/') + 1);
        char eb[32] = "-", er[32] = "-";
        if (eig > 0) {
            std::snprintf(eb, sizeof eb, "%.3f", eig);
            std::snprintf(er, sizeof er, "%.2f", best / eig);
        }
        std::printf("%-22s %9.3f %13s %7s %14.3f %7.2f\n", name.c_str(), best, eb, er, quoted,
                    quoted > 0 ? best / quoted : 0.0);
    }
    return 0;
}
