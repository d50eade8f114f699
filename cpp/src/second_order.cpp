// Second-order RNNs: Giles et al.'s full form and Sutskever et al.'s factored
// multiplicative RNN. The large products run in rnncore's GEMM (ISA-dispatched); the time
// loop follows the same conventions as the layer stack (lengths carry the state).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "rnncore/classic.hpp"

namespace rnncore {

template <class T> struct SecondOrderCache {
    int64_t steps = 0, batch = 0;
    std::vector<int64_t> lengths;
    std::vector<T> x;      // [T*B, I]
    std::vector<T> m;      // full: [T*B, H*H] = x (W viewed as [H*H, I])^T; factored: U [T*B, r]
    std::vector<T> v;      // factored: W_fh h_{t-1} [T*B, r]
    std::vector<T> hbuf;   // [T+1, B, H], slot t = state entering step t
};

template <class T> int64_t second_order_cache_steps(const SecondOrderCache<T>& c) { return c.steps; }
template <class T> int64_t second_order_cache_batch(const SecondOrderCache<T>& c) { return c.batch; }

namespace {
inline bool on(const int64_t* len, int64_t b, int64_t t) { return !len || t < len[b]; }

template <class T> void check(const SecondOrderParams<T>& p) {
    if (p.input_size < 1 || p.hidden_size < 1 || p.rank < 0)
        throw std::invalid_argument("SecondOrderRNN: sizes must be positive");
    if (p.rank == 0 ? !p.w : (!p.w_fx || !p.w_fh || !p.w_hf || !p.w_hx))
        throw std::invalid_argument("SecondOrderRNN: missing weights");
}
}  // namespace

template <class T>
void second_order_forward(const SecondOrderParams<T>& p, int64_t TT, int64_t B, const T* x,
                          const T* h0, const int64_t* lengths, T* y, T* h_n,
                          std::shared_ptr<SecondOrderCache<T>>* cache) {
    check(p);
    const int64_t I = p.input_size, H = p.hidden_size, r = p.rank, R = TT * B;
    if (TT < 1 || B < 1) throw std::invalid_argument("x: expected at least one step and one sequence");
    if (lengths)
        for (int64_t b = 0; b < B; ++b)
            if (lengths[b] < 1 || lengths[b] > TT)
                throw std::invalid_argument("lengths: expected values in [1, " + std::to_string(TT) + "]");
    auto c = std::make_shared<SecondOrderCache<T>>();
    c->steps = TT; c->batch = B;
    if (lengths) c->lengths.assign(lengths, lengths + B);
    const int64_t* len = lengths ? c->lengths.data() : nullptr;
    c->x.assign(x, x + R * I);
    c->hbuf.resize((TT + 1) * B * H);
    if (h0) std::memcpy(c->hbuf.data(), h0, sizeof(T) * B * H);
    else std::fill(c->hbuf.begin(), c->hbuf.begin() + B * H, T(0));
    std::vector<T> a(B * H), z;
    if (r == 0) {
        c->m.resize(R * H * H);
        gemm<T>(false, true, R, H * H, I, T(1), x, I, p.w, I, T(0), c->m.data(), H * H);
    } else {
        c->m.resize(R * r);
        c->v.resize(R * r);
        z.resize(R * H);
        gemm<T>(false, true, R, r, I, T(1), x, I, p.w_fx, I, T(0), c->m.data(), r);
        gemm<T>(false, true, R, H, I, T(1), x, I, p.w_hx, I, T(0), z.data(), H);
    }
    std::vector<T> f(B * (r > 0 ? r : 1));
    for (int64_t t = 0; t < TT; ++t) {
        const T* hp = c->hbuf.data() + t * B * H;
        T* hn = c->hbuf.data() + (t + 1) * B * H;
        if (r == 0) {
            for (int64_t b = 0; b < B; ++b) {
                const T* M = c->m.data() + (t * B + b) * H * H;
                for (int64_t i = 0; i < H; ++i) {
                    T s = p.b ? p.b[i] : T(0);
                    const T* Mi = M + i * H;
                    for (int64_t j = 0; j < H; ++j) s += Mi[j] * hp[b * H + j];
                    a[b * H + i] = s;
                }
            }
        } else {
            T* vt = c->v.data() + t * B * r;
            gemm<T>(false, true, B, r, H, T(1), hp, H, p.w_fh, H, T(0), vt, r);
            const T* ut = c->m.data() + t * B * r;
            for (int64_t k = 0; k < B * r; ++k) f[k] = ut[k] * vt[k];
            std::memcpy(a.data(), z.data() + t * B * H, sizeof(T) * B * H);
            gemm<T>(false, true, B, H, r, T(1), f.data(), r, p.w_hf, r, T(1), a.data(), H);
            if (p.b)
                for (int64_t b = 0; b < B; ++b)
                    for (int64_t i = 0; i < H; ++i) a[b * H + i] += p.b[i];
        }
        for (int64_t b = 0; b < B; ++b) {
            T* yb = y + (t * B + b) * H;
            if (on(len, b, t)) {
                for (int64_t i = 0; i < H; ++i) hn[b * H + i] = std::tanh(a[b * H + i]);
                std::memcpy(yb, hn + b * H, sizeof(T) * H);
            } else {
                std::memcpy(hn + b * H, hp + b * H, sizeof(T) * H);
                std::fill(yb, yb + H, T(0));
            }
        }
    }
    std::memcpy(h_n, c->hbuf.data() + TT * B * H, sizeof(T) * B * H);
    if (cache) *cache = c;
}

template <class T>
void second_order_backward(const SecondOrderParams<T>& p, const SecondOrderCache<T>& c,
                           const T* dy, const T* dh_n, T* dx, T* dh0, const SecondOrderGrads<T>& g) {
    check(p);
    const int64_t I = p.input_size, H = p.hidden_size, r = p.rank, TT = c.steps, B = c.batch, R = TT * B;
    const int64_t* len = c.lengths.empty() ? nullptr : c.lengths.data();
    std::vector<T> dh(B * H, T(0)), dz(R * H, T(0));
    if (dh_n) std::memcpy(dh.data(), dh_n, sizeof(T) * B * H);
    std::vector<T> dm(r == 0 ? R * H * H : R * r, T(0)), dv(r > 0 ? R * r : 0, T(0));
    std::vector<T> df(B * (r > 0 ? r : 1)), dhp(B * H);
    for (int64_t t = TT - 1; t >= 0; --t) {
        const T* hp = c.hbuf.data() + t * B * H;
        const T* hn = c.hbuf.data() + (t + 1) * B * H;
        T* dzt = dz.data() + t * B * H;
        for (int64_t b = 0; b < B; ++b) {
            if (!on(len, b, t)) continue;
            for (int64_t i = 0; i < H; ++i) {
                T d = dh[b * H + i] + (dy ? dy[(t * B + b) * H + i] : T(0));
                const T h = hn[b * H + i];
                dzt[b * H + i] = d * (T(1) - h * h);
            }
        }
        if (r == 0) {
            for (int64_t b = 0; b < B; ++b) {
                if (!on(len, b, t)) continue;
                const T* M = c.m.data() + (t * B + b) * H * H;
                T* dM = dm.data() + (t * B + b) * H * H;
                const T* da = dzt + b * H;
                T* out = dh.data() + b * H;
                std::fill(out, out + H, T(0));
                for (int64_t i = 0; i < H; ++i) {
                    const T di = da[i];
                    const T* Mi = M + i * H;
                    T* dMi = dM + i * H;
                    for (int64_t j = 0; j < H; ++j) {
                        dMi[j] = di * hp[b * H + j];
                        out[j] += di * Mi[j];
                    }
                }
            }
        } else {
            const T* ut = c.m.data() + t * B * r;
            const T* vt = c.v.data() + t * B * r;
            T* dut = dm.data() + t * B * r;
            T* dvt = dv.data() + t * B * r;
            gemm<T>(false, false, B, r, H, T(1), dzt, H, p.w_hf, r, T(0), df.data(), r);
            for (int64_t k = 0; k < B * r; ++k) { dut[k] = df[k] * vt[k]; dvt[k] = df[k] * ut[k]; }
            gemm<T>(false, false, B, H, r, T(1), dvt, r, p.w_fh, H, T(0), dhp.data(), H);
            for (int64_t b = 0; b < B; ++b)
                if (on(len, b, t)) std::memcpy(dh.data() + b * H, dhp.data() + b * H, sizeof(T) * H);
        }
    }
    std::memcpy(dh0, dh.data(), sizeof(T) * B * H);
    if (g.b)
        for (int64_t k = 0; k < R; ++k)
            for (int64_t i = 0; i < H; ++i) g.b[i] += dz[k * H + i];
    const T* X = c.x.data();
    if (r == 0) {
        gemm<T>(true, false, H * H, I, R, T(1), dm.data(), H * H, X, I, T(1), g.w, I);
        if (dx) gemm<T>(false, false, R, I, H * H, T(1), dm.data(), H * H, p.w, I, T(0), dx, I);
        return;
    }
    std::vector<T> F(R * r);
    for (int64_t k = 0; k < R * r; ++k) F[k] = c.m[k] * c.v[k];
    gemm<T>(true, false, H, I, R, T(1), dz.data(), H, X, I, T(1), g.w_hx, I);
    gemm<T>(true, false, H, r, R, T(1), dz.data(), H, F.data(), r, T(1), g.w_hf, r);
    gemm<T>(true, false, r, H, R, T(1), dv.data(), r, c.hbuf.data(), H, T(1), g.w_fh, H);
    gemm<T>(true, false, r, I, R, T(1), dm.data(), r, X, I, T(1), g.w_fx, I);
    if (!dx) return;   // (no input gradient asked for)
    gemm<T>(false, false, R, I, r, T(1), dm.data(), r, p.w_fx, I, T(0), dx, I);
    gemm<T>(false, false, R, I, H, T(1), dz.data(), H, p.w_hx, I, T(1), dx, I);
}

#define RNNCORE_SO(T)                                                                             \
    template void second_order_forward<T>(const SecondOrderParams<T>&, int64_t, int64_t, const T*, \
                                          const T*, const int64_t*, T*, T*,                       \
                                          std::shared_ptr<SecondOrderCache<T>>*);                 \
    template void second_order_backward<T>(const SecondOrderParams<T>&, const SecondOrderCache<T>&, \
                                           const T*, const T*, T*, T*, const SecondOrderGrads<T>&); \
    template int64_t second_order_cache_steps<T>(const SecondOrderCache<T>&);                     \
    template int64_t second_order_cache_batch<T>(const SecondOrderCache<T>&);
RNNCORE_SO(float)
RNNCORE_SO(double)

}  // namespace rnncore
