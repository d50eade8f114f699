// The per-step baseline of the C++ benchmark, measured in the same run as rnncore: one LSTM or
// GRU step at batch 1 with compile-time sizes and Eigen fixed-size matrices, written the way
// RTNeural's compile-time API (LSTMLayerT / GRULayerT, Eigen backend) computes a step:
//   LSTM: per gate g in {f, i, o, c}: g = b_g + U_g h + W_g x (column-major W_g [H, I],
//         U_g [H, H]); sigmoid as 1 / (exp(-x) + 1), Eigen's tanh; c = f c + i tanh(c~);
//         h = o tanh(c).
//   GRU:  alpha = [W | b0] [x; 1], beta = [U | b1] [h; 1] (3H rows, z r c order);
//         gamma = sigmoid(alpha[:2H] + beta[:2H]); c = tanh(alpha_c + r * beta_c);
//         h = c + z (h - c).
// run.sh compiles this file with -O3 -march=native (RTNeural's recommended flags; opt-in
// through EIGEN_REF_NATIVE=ON, which run.sh passes), unlike
// rnncore, which is the portable build with run-time ISA dispatch. Weights are random at
// PyTorch's init scale (the time of a step does not depend on their values).
// The layers are heap-allocated (new), so fixed-size members may exceed Eigen's stack limit.
#define EIGEN_STACK_ALLOCATION_LIMIT 0
#include <Eigen/Dense>

#include <chrono>
#include <random>

#include "eigen_ref.hpp"

namespace {

template <int N, int M> void fill(Eigen::Matrix<float, N, M>& m, std::mt19937& g, float s) {
    std::uniform_real_distribution<float> u(-s, s);
    for (int j = 0; j < m.cols(); ++j)
        for (int i = 0; i < m.rows(); ++i) m(i, j) = u(g);
}

template <int I, int H> struct Lstm {
    Eigen::Matrix<float, H, I> Wf, Wi, Wo, Wc;
    Eigen::Matrix<float, H, H> Uf, Ui, Uo, Uc;
    Eigen::Matrix<float, H, 1> bf, bi, bo, bc, f, i, o, ct, c, h;
    explicit Lstm(std::mt19937& g) {
        const float s = 1.0f / std::sqrt((float)H);
        fill(Wf, g, s); fill(Wi, g, s); fill(Wo, g, s); fill(Wc, g, s);
        fill(Uf, g, s); fill(Ui, g, s); fill(Uo, g, s); fill(Uc, g, s);
        fill(bf, g, s); fill(bi, g, s); fill(bo, g, s); fill(bc, g, s);
        c.setZero();
        h.setZero();
    }
    static Eigen::Matrix<float, H, 1> sigmoid(const Eigen::Matrix<float, H, 1>& x) {
        return (1.0f / ((-1.0f * x.array()).exp() + 1.0f)).matrix();
    }
    void step(const Eigen::Matrix<float, I, 1>& x) {
        f.noalias() = bf; f.noalias() += Uf * h; f.noalias() += Wf * x;
        i.noalias() = bi; i.noalias() += Ui * h; i.noalias() += Wi * x;
        o.noalias() = bo; o.noalias() += Uo * h; o.noalias() += Wo * x;
        f = sigmoid(f); i = sigmoid(i); o = sigmoid(o);
        ct.noalias() = bc; ct.noalias() += Uc * h; ct.noalias() += Wc * x;
        ct = ct.array().tanh();
        c = f.cwiseProduct(c);
        c.noalias() += i.cwiseProduct(ct);
        h = c.array().tanh();
        h = o.cwiseProduct(h);
    }
};

template <int I, int H> struct Gru {
    Eigen::Matrix<float, 3 * H, I + 1> W;
    Eigen::Matrix<float, 3 * H, H + 1> U;
    Eigen::Matrix<float, 3 * H, 1> alpha, beta;
    Eigen::Matrix<float, 2 * H, 1> gamma;
    Eigen::Matrix<float, H, 1> c;
    Eigen::Matrix<float, I + 1, 1> xe;
    Eigen::Matrix<float, H + 1, 1> he;
    explicit Gru(std::mt19937& g) {
        const float s = 1.0f / std::sqrt((float)H);
        fill(W, g, s);
        fill(U, g, s);
        xe.setZero();
        xe(I) = 1.0f;
        he.setZero();
        he(H) = 1.0f;
    }
    void step(const Eigen::Matrix<float, I, 1>& x) {
        for (int k = 0; k < I; ++k) xe(k) = x(k);
        alpha.noalias() = W * xe;
        beta.noalias() = U * he;
        gamma = (1.0f / ((-1.0f * (alpha.segment(0, 2 * H) + beta.segment(0, 2 * H)).array()).exp() + 1.0f)).matrix();
        c.noalias() = alpha.segment(2 * H, H) + gamma.segment(H, H).cwiseProduct(beta.segment(2 * H, H));
        c = c.array().tanh();
        he.segment(0, H) = c + gamma.segment(0, H).cwiseProduct(he.segment(0, H) - c);
    }
};

template <class Layer, int I> double time_layer(int warm, int n, int reps, float* sink) {
    std::mt19937 g(0);
    auto* layer = new Layer(g);   // fixed-size members can be large: keep them off the stack
    Eigen::Matrix<float, I, 1> x;
    x.setConstant(0.1f);
    for (int k = 0; k < warm; ++k) layer->step(x);
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int k = 0; k < n; ++k) layer->step(x);
        const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / n;
        if (us < best) best = us;
    }
    *sink += 0.0f * layer->c(0);
    delete layer;
    return best;
}

}  // namespace

double eigen_step_us(bool lstm, int in, int hid, int warm, int n, int reps) {
    float sink = 0.0f;
    double r = -1.0;
    if (lstm && in == 32 && hid == 64) r = time_layer<Lstm<32, 64>, 32>(warm, n, reps, &sink);
    else if (!lstm && in == 32 && hid == 64) r = time_layer<Gru<32, 64>, 32>(warm, n, reps, &sink);
    else if (lstm && in == 128 && hid == 256) r = time_layer<Lstm<128, 256>, 128>(warm, n, reps, &sink);
    else if (!lstm && in == 128 && hid == 256) r = time_layer<Gru<128, 256>, 128>(warm, n, reps, &sink);
    return r + sink;
}
