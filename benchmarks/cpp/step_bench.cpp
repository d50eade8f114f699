// One streaming step at batch 1, one thread, fp32, through rnncore's C++ API (Model::step,
// the default portable build with run-time ISA dispatch), next to the figures of RTNeural's
// compile-time API (Eigen, -O3 -march=native) quoted in the speed issue.
//   bash benchmarks/cpp/run.sh      (saves the layers from Python, builds, runs)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "rnncore/model.hpp"
#include "rnncore/runtime.hpp"

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODEL:RTNEURAL_US ...\n", argv[0]);
        return 2;
    }
    rnncore::set_num_threads(1);
    std::printf("rnncore %s, isa %s, 1 thread, batch 1, fp32: microseconds per Model::step (best of 5)\n",
                rnncore::version(), rnncore::isa_name().c_str());
    std::printf("%-28s %10s %10s %7s\n", "model", "rnncore", "RTNeural", "ratio");
    for (int a = 1; a < argc; ++a) {
        const std::string arg = argv[a];
        const size_t colon = arg.rfind(':');
        const std::string path = arg.substr(0, colon);
        const double ref = colon == std::string::npos ? 0.0 : std::atof(arg.c_str() + colon + 1);
        rnncore::Model m = rnncore::Model::load(path);
        auto st = m.new_state(1);
        std::vector<float> x(m.input_size(), 0.1f), y(m.output_size());
        const int warm = 2000, n = 20000;
        for (int i = 0; i < warm; ++i) m.step(x.data(), st, y.data());
        double best = 1e30;
        for (int rep = 0; rep < 5; ++rep) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int i = 0; i < n; ++i) m.step(x.data(), st, y.data());
            const double us =
                std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / n;
            if (us < best) best = us;
        }
        const std::string name = path.substr(path.find_last_of('/') + 1);
        std::printf("%-28s %10.3f %10.3f %7.2f\n", name.c_str(), best, ref, ref > 0 ? best / ref : 0.0);
    }
    return 0;
}
