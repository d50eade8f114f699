// C++ tests of the model reader and runner, meant to run under AddressSanitizer and
// UndefinedBehaviorSanitizer (tests/test_sanitizers.py builds and runs them).
//   test_model DIR
// DIR holds cases written by the Python test: NAME.rnnc with NAME.case (a line "T B" and
// the expected predict/step output sizes), NAME.x, NAME.predict, NAME.step (raw float32);
// and bad_*.rnnc files that must be refused with rnncore::Error.
#include <cmath>
#include <cstdio>
#include <dirent.h>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "rnncore/layer.hpp"
#include "rnncore/model.hpp"
#include "rnncore/rnncore.h"
#include "rnncore/runtime.hpp"

static int passed = 0, failed = 0;

static void check(bool ok, const std::string& what) {
    if (ok) ++passed;
    else { ++failed; std::printf("FAIL %s\n", what.c_str()); }
}

static std::vector<float> read_f32(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::vector<float> v;
    float x;
    while (f.read(reinterpret_cast<char*>(&x), sizeof x)) v.push_back(x);
    return v;
}

static bool close(const std::vector<float>& a, const std::vector<float>& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (std::fabs(a[i] - b[i]) > 1e-5f * (1.0f + std::fabs(b[i]))) return false;
    return true;
}

// Each of nthreads threads steps the shared model through x [T, B, I] with a state of its
// own; returns each thread's outputs of every step.
static std::vector<std::vector<float>> step_threads(const rnncore::Model& m, const std::vector<float>& x,
                                                    long T, long B, int nthreads) {
    std::vector<std::vector<float>> outs(nthreads);
    std::vector<std::thread> ts;
    for (int k = 0; k < nthreads; ++k)
        ts.emplace_back([&, k] {
            auto st = m.new_state(B);
            std::vector<float> yt(B * m.output_size());
            for (long t = 0; t < T; ++t) {
                m.step(x.data() + t * B * m.input_size(), st, yt.data());
                outs[k].insert(outs[k].end(), yt.begin(), yt.end());
            }
        });
    for (auto& t : ts) t.join();
    return outs;
}

int main(int argc, char** argv) {
    if (argc != 2) { std::fprintf(stderr, "usage: %s DIR\n", argv[0]); return 2; }
    const std::string dir = argv[1];
    std::vector<std::string> names;
    if (DIR* d = opendir(dir.c_str())) {
        while (dirent* e = readdir(d)) names.push_back(e->d_name);
        closedir(d);
    }
    for (const auto& n : names) {
        if (n.size() < 6 || n.compare(n.size() - 5, 5, ".rnnc") != 0) continue;
        const std::string path = dir + "/" + n, base = path.substr(0, path.size() - 5);
        if (n.rfind("bad_", 0) == 0) {
            bool refused = false;
            try { rnncore::Model::load(path); } catch (const rnncore::Error&) { refused = true; }
            check(refused, "refuses " + n);
            rnncore_model* m = nullptr;
            const int rc = rnncore_model_load(path.c_str(), &m);
            check(rc == RNNCORE_ERROR_BAD_MODEL && m == nullptr && *rnncore_last_error(), "C API refuses " + n);
            continue;
        }
        std::ifstream cf(base + ".case");
        long T = 0, B = 0;
        cf >> T >> B;
        try {
            rnncore::Model m = rnncore::Model::load(path);
            const auto x = read_f32(base + ".x");
            std::vector<float> y(m.predict_size(T, B));
            m.predict(x.data(), T, B, y.data());
            check(close(y, read_f32(base + ".predict")), "predict " + n);
            {
                // the batch repeated 3 times (B > 4: the packed-weights path, kept by the
                // model), predicted twice by each of three threads at once
                const long R = 3, I = (long)m.input_size();
                std::vector<float> xr(T * R * B * I);
                for (long t = 0; t < T; ++t)
                    for (long k = 0; k < R; ++k)
                        for (long b = 0; b < B; ++b)
                            for (long i = 0; i < I; ++i)
                                xr[((t * R + k) * B + b) * I + i] = x[(t * B + b) * I + i];
                std::vector<std::vector<float>> yr(3, std::vector<float>(m.predict_size(T, R * B)));
                std::vector<std::thread> ts;
                for (int k = 0; k < 3; ++k)
                    ts.emplace_back([&, k] {
                        m.predict(xr.data(), T, R * B, yr[k].data());
                        m.predict(xr.data(), T, R * B, yr[k].data());
                    });
                for (auto& t : ts) t.join();
                const long rows = m.many_to_one() ? 1 : T, O = (long)m.output_size();
                for (int k = 0; k < 3; ++k) {
                    std::vector<float> back(y.size());
                    for (long r = 0; r < rows; ++r)
                        for (long b = 0; b < B; ++b)
                            for (long o = 0; o < O; ++o)
                                back[(r * B + b) * O + o] = yr[k][((r * R + 1) * B + b) * O + o];
                    check(close(back, y), "predict repeated batch " + n + " thread " + std::to_string(k));
                }
            }
            if (m.streamable()) {
                const auto want = read_f32(base + ".step");
                const auto outs = step_threads(m, x, T, B, 4);   // four threads share the model
                for (int k = 0; k < 4; ++k) check(close(outs[k], want), "step " + n + " thread " + std::to_string(k));
            }
            {
                // bfloat16 recurrent weights: Python's bfloat16 outputs, predict and two
                // threads stepping at once
                rnncore::Model mb = rnncore::Model::load(path, rnncore::Precision::BFloat16);
                check(mb.recurrent_precision() == rnncore::Precision::BFloat16, "precision " + n);
                std::vector<float> yb(mb.predict_size(T, B));
                mb.predict(x.data(), T, B, yb.data());
                check(close(yb, read_f32(base + ".predict16")), "bf16 predict " + n);
                check(!close(yb, y), "bf16 predict differs from float32 " + n);
                if (mb.streamable()) {
                    const auto want = read_f32(base + ".step16");
                    const auto outs = step_threads(mb, x, T, B, 2);
                    for (int k = 0; k < 2; ++k) check(close(outs[k], want), "bf16 step " + n + " thread " + std::to_string(k));
                }
            }
            // bad arguments are refused, not crashed on
            bool refused = false;
            try { m.predict(x.data(), 0, B, y.data()); } catch (const rnncore::Error&) { refused = true; }
            check(refused, "predict T=0 " + n);
            std::vector<int64_t> lens(B, T + 1);
            refused = false;
            try { m.predict(x.data(), T, B, y.data(), lens.data()); } catch (const rnncore::Error&) { refused = true; }
            check(refused, "predict bad lengths " + n);
        } catch (const std::exception& e) {
            check(false, n + ": " + e.what());
        }
    }
    check(rnncore_model_load(nullptr, nullptr) == RNNCORE_ERROR_INVALID_ARGUMENT, "C API NULL");
    {   // StepPacks: the packed step of a GRU I=5 H=7, and packs of another stack refused
        rnncore::LayerSpec s;
        s.cell = rnncore::CellType::GRU; s.input_size = 5; s.hidden_size = 7;
        std::vector<float> wih(21 * 5, 0.1f), whh(21 * 7, -0.05f), bih(21, 0.2f), bhh(21, 0.0f);
        rnncore::DirParams<float> w{};
        w.w_ih = wih.data(); w.w_hh = whh.data(); w.b_ih = bih.data(); w.b_hh = bhh.data();
        const std::vector<rnncore::DirParams<float>> ps{w};
        const rnncore::StepPacks<float> packs(s, ps);
        std::vector<float> x(2 * 5, 1.0f), h(2 * 7, 0.0f), h2(2 * 7, 0.0f), y(2 * 7), y2(2 * 7);
        rnncore::stack_step<float>(s, ps, 2, x.data(), h.data(), nullptr, y.data(), packs);
        rnncore::stack_step<float>(s, ps, 2, x.data(), h2.data(), nullptr, y2.data());
        check(close(y, y2) && packs.bytes() > 0, "StepPacks step equals the in-place step");
        rnncore::LayerSpec t = s;
        t.hidden_size = 9;
        std::vector<float> hw(2 * 9, 0.0f), yw(2 * 9);
        bool refused = false;
        try {
            rnncore::stack_step<float>(t, ps, 2, x.data(), hw.data(), nullptr, yw.data(), packs);
        } catch (const std::invalid_argument&) { refused = true; }
        check(refused, "StepPacks of another stack refused");
    }
    std::printf("isa %s\n", rnncore::isa_name().c_str());
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
