// Training forward with the recurrence's full team, then backward called from inside an
// active OpenMP parallel region, where nested parallelism is off so its team is one thread:
// the backward finds the gate activations blocked by a team it cannot get, converts them
// back to row-major and runs with the team it has. Its dx, initial-state gradients and every
// weight gradient must equal those of the same backward called outside (float64; summation
// orders differ between teams). Then a forward from one thread of an OpenMP region. Built and
// run by tests/test_native.py.
//   test_team_change        prints "max_rel_err <e> checked <n>" and exits 0 when e < 1e-11
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "rnncore/layer.hpp"
#include "rnncore/runtime.hpp"

using namespace rnncore;

struct Result {
    std::vector<double> dx, dh0, dc0;
    std::vector<std::vector<double>> grads;
};

static Result train_step(const LayerSpec& s, const std::vector<std::vector<double>>& values,
                         const std::vector<ParamInfo>& info, int64_t T, int64_t B,
                         const std::vector<double>& x, const std::vector<double>& dy, bool nested) {
    const int64_t L = s.num_layers, D = s.dirs(), H = s.hidden_size, P = s.out_size();
    std::vector<DirParams<double>> params(L * D);
    std::vector<DirGrads<double>> grads(L * D);
    Result r;
    r.grads.resize(info.size());
    for (size_t i = 0; i < info.size(); ++i) {
        set_param(params[info[i].layer * D + info[i].dir], info[i].kind, values[i].data());
        r.grads[i].assign(values[i].size(), 0.0);
        set_param(grads[info[i].layer * D + info[i].dir], info[i].kind, r.grads[i].data());
    }
    std::vector<double> y(T * B * D * P), hn(L * D * B * P), cn(L * D * B * H);
    PackedWeights packed;
    ForwardArgs<double> fa;
    fa.steps = T;
    fa.batch = B;
    fa.x = x.data();
    fa.packed = &packed;
    ForwardOut<double> fo{y.data(), hn.data(), cn.data()};
    std::shared_ptr<StackCache<double>> cache;
    stack_forward(s, params, fa, fo, &cache);

    r.dx.assign(T * B * s.input_size, 0.0);
    r.dh0.assign(L * D * B * P, 0.0);
    r.dc0.assign(L * D * B * H, 0.0);
    BackwardArgs<double> ba;
    ba.dy = dy.data();
    BackwardOut<double> bo{r.dx.data(), r.dh0.data(), r.dc0.data()};
    if (nested) {
#pragma omp parallel num_threads(2)
        {
            if (omp_get_thread_num() == 0) stack_backward(s, params, *cache, ba, bo, grads);
        }
    } else {
        stack_backward(s, params, *cache, ba, bo, grads);
    }
    return r;
}

static std::vector<std::vector<double>> random_params(const std::vector<ParamInfo>& info,
                                                      std::mt19937_64& gen) {
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<std::vector<double>> values;
    for (const ParamInfo& p : info) {
        int64_t n = 1;
        for (int64_t d : p.shape) n *= d;
        std::vector<double> v(n);
        for (double& e : v) e = 0.2 * nd(gen);
        values.push_back(v);
    }
    return values;
}

static double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
    double num = 0, den = 1e-300;
    for (size_t i = 0; i < a.size(); ++i) {
        num = std::max(num, std::fabs(a[i] - b[i]));
        den = std::max(den, std::fabs(b[i]));
    }
    return num / den;
}

int main() {
    omp_set_max_active_levels(1);   // a parallel region inside an active one gets one thread
    set_num_threads(2);
    std::mt19937_64 gen(7);
    std::normal_distribution<double> nd(0.0, 1.0);
    double worst = 0;
    int checked = 0;
    for (CellType cell : {CellType::LSTM, CellType::GRU}) {
        LayerSpec s;
        s.cell = cell;
        s.input_size = 24;
        s.hidden_size = 96;
        s.bidirectional = true;
        const int64_t T = 19, B = 9;
        const std::vector<ParamInfo> info = param_info(s);
        const std::vector<std::vector<double>> values = random_params(info, gen);
        std::vector<double> x(T * B * s.input_size), dy(T * B * s.dirs() * s.out_size());
        for (double& e : x) e = nd(gen);
        for (double& e : dy) e = nd(gen);
        const Result want = train_step(s, values, info, T, B, x, dy, false);
        const Result got = train_step(s, values, info, T, B, x, dy, true);
        worst = std::max(worst, rel_err(got.dx, want.dx));
        worst = std::max(worst, rel_err(got.dh0, want.dh0));
        if (s.is_lstm()) worst = std::max(worst, rel_err(got.dc0, want.dc0));
        for (size_t i = 0; i < info.size(); ++i) worst = std::max(worst, rel_err(got.grads[i], want.grads[i]));
        checked += 3 + (int)info.size();
    }
    // Inference without kept weights at B = 4, T = 20 projects the input with one GEMM of 80
    // rows (a team of one inside the caller's region: its barriers must not bind to the
    // caller's team, whose other thread never meets them), from one thread of a region.
    {
        LayerSpec s;
        s.cell = CellType::GRU;
        s.input_size = 40;
        s.hidden_size = 64;
        const int64_t T = 20, B = 4;
        const std::vector<ParamInfo> info = param_info(s);
        const std::vector<std::vector<double>> values = random_params(info, gen);
        std::vector<DirParams<double>> params(1);
        for (size_t i = 0; i < info.size(); ++i) set_param(params[0], info[i].kind, values[i].data());
        std::vector<double> x(T * B * s.input_size);
        for (double& e : x) e = nd(gen);
        std::vector<double> y1(T * B * s.hidden_size), h1(B * s.hidden_size);
        std::vector<double> y2(y1.size()), h2(h1.size()), c(1);
        ForwardArgs<double> fa;
        fa.steps = T;
        fa.batch = B;
        fa.x = x.data();
        stack_forward<double>(s, params, fa, ForwardOut<double>{y1.data(), h1.data(), c.data()}, nullptr);
#pragma omp parallel num_threads(2)
        {
            if (omp_get_thread_num() == 0)
                stack_forward<double>(s, params, fa, ForwardOut<double>{y2.data(), h2.data(), c.data()}, nullptr);
        }
        worst = std::max(worst, rel_err(y2, y1));
        worst = std::max(worst, rel_err(h2, h1));
        checked += 2;
    }
    std::printf("max_rel_err %.3g checked %d\n", worst, checked);
    return worst < 1e-11 ? 0 : 1;
}
