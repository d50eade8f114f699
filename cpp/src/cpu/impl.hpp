// Kernels of rnncore, written once and compiled once per ISA.
//
// Include this from a translation unit that defines
//   RNNCORE_ISA_NS     the namespace of this copy (isa_generic, isa_avx2, isa_avx512)
//   RNNCORE_ISA_NAME   its name as shown by rnncore.info()
//   RNNCORE_VEC_BYTES  the SIMD register width the unit is compiled for (16, 32, 64)
// and compiles it with the matching flags. Everything here lives in that namespace; no
// standard library template is instantiated here (see kernels.hpp for why).
//
// GEMM: C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C, row-major.
// B is packed into panels of NR columns, [N/NR][K][NR]; A into panels of MR rows,
// [M/MR][K][MR], both zero padded. The micro-kernel holds an mr x NR block of C in
// registers (GCC/Clang vector extensions, so one source serves every ISA).
#pragma once

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "kernels.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rnncore {
namespace RNNCORE_ISA_NS {
namespace {

constexpr int VB = RNNCORE_VEC_BYTES;

template <class T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(VB))); };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(VB))); };

template <class T> constexpr int VL = VB / (int)sizeof(T);   // lanes per register
template <class T> constexpr int NR = 2 * VL<T>;             // columns per B panel
constexpr int MR = VB >= 32 ? 6 : 4;                          // rows per A panel
constexpr int64_t KC = 384;                                   // K block of the big GEMM

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T> inline int64_t packed_b_size(int64_t K, int64_t N) {
    return ceil_div(N, NR<T>) * NR<T> * K;
}
inline int64_t packed_a_size(int64_t M, int64_t K) { return ceil_div(M, MR) * MR * K; }

// op(B)[k, n] = tb ? B[n*ldb + k] : B[k*ldb + n]
template <class T>
void pack_b(bool tb, int64_t K, int64_t N, const T* B, int64_t ldb, T* out) {
    const int nr = NR<T>;
    const int64_t panels = ceil_div(N, nr);
    for (int64_t p = 0; p < panels; ++p) {
        T* dst = out + p * K * nr;
        const int64_t n0 = p * nr;
        const int64_t nn = N - n0 < nr ? N - n0 : nr;
        if (!tb) {
            for (int64_t k = 0; k < K; ++k) {
                const T* src = B + k * ldb + n0;
                int64_t c = 0;
                for (; c < nn; ++c) dst[k * nr + c] = src[c];
                for (; c < nr; ++c) dst[k * nr + c] = T(0);
            }
        } else {
            for (int64_t k = 0; k < K; ++k)
                for (int64_t c = nn; c < nr; ++c) dst[k * nr + c] = T(0);
            for (int64_t c = 0; c < nn; ++c) {
                const T* src = B + (n0 + c) * ldb;
                for (int64_t k = 0; k < K; ++k) dst[k * nr + c] = src[k];
            }
        }
    }
}

// op(A)[m, k] = ta ? A[k*lda + m] : A[m*lda + k]
template <class T>
void pack_a(bool ta, int64_t M, int64_t K, const T* A, int64_t lda, T* out) {
    const int64_t panels = ceil_div(M, MR);
    for (int64_t p = 0; p < panels; ++p) {
        T* dst = out + p * K * MR;
        const int64_t m0 = p * MR;
        const int64_t mm = M - m0 < MR ? M - m0 : MR;
        if (!ta) {
            for (int64_t r = 0; r < mm; ++r) {
                const T* src = A + (m0 + r) * lda;
                for (int64_t k = 0; k < K; ++k) dst[k * MR + r] = src[k];
            }
        } else {
            for (int64_t k = 0; k < K; ++k) {
                const T* src = A + k * lda + m0;
                for (int64_t r = 0; r < mm; ++r) dst[k * MR + r] = src[r];
            }
        }
        for (int64_t r = mm; r < MR; ++r)
            for (int64_t k = 0; k < K; ++k) dst[k * MR + r] = T(0);
    }
}

template <class T, int mr>
inline void micro(int64_t K, const T* __restrict a, const T* __restrict b, T* __restrict c,
                  int64_t ldc, int64_t ncols, T alpha, T beta) {
    typedef typename Vec<T>::type V;
    constexpr int L = VL<T>;
    V acc0[mr], acc1[mr];
    for (int r = 0; r < mr; ++r) { acc0[r] = V{} ; acc1[r] = V{}; }
    for (int64_t k = 0; k < K; ++k) {
        V b0, b1;
        std::memcpy(&b0, b + k * 2 * L, sizeof(V));
        std::memcpy(&b1, b + k * 2 * L + L, sizeof(V));
        const T* ak = a + k * MR;
        for (int r = 0; r < mr; ++r) {
            const T av = ak[r];
            acc0[r] += av * b0;
            acc1[r] += av * b1;
        }
    }
    for (int r = 0; r < mr; ++r) {
        T tmp[2 * L];
        std::memcpy(tmp, &acc0[r], sizeof(V));
        std::memcpy(tmp + L, &acc1[r], sizeof(V));
        T* cr = c + r * ldc;
        if (beta == T(0)) {
            for (int64_t j = 0; j < ncols; ++j) cr[j] = alpha * tmp[j];
        } else {
            for (int64_t j = 0; j < ncols; ++j) cr[j] = alpha * tmp[j] + beta * cr[j];
        }
    }
}

template <class T>
inline void micro_dispatch(int mr, int64_t K, const T* a, const T* b, T* c, int64_t ldc,
                           int64_t ncols, T alpha, T beta) {
    switch (mr) {
        case 1: micro<T, 1>(K, a, b, c, ldc, ncols, alpha, beta); break;
        case 2: micro<T, 2>(K, a, b, c, ldc, ncols, alpha, beta); break;
        case 3: micro<T, 3>(K, a, b, c, ldc, ncols, alpha, beta); break;
        case 4: micro<T, 4>(K, a, b, c, ldc, ncols, alpha, beta); break;
#if RNNCORE_VEC_BYTES >= 32
        case 5: micro<T, 5>(K, a, b, c, ldc, ncols, alpha, beta); break;
        case 6: micro<T, 6>(K, a, b, c, ldc, ncols, alpha, beta); break;
#endif
        default: break;
    }
}

// All tiles of C from packed A and packed B. Tiles are ordered N-panel major so that with
// a static schedule each thread keeps the same slice of B (e.g. of W_hh) across calls.
template <class T>
void tiles(int64_t M, int64_t N, int64_t K, const T* Ap, const T* Bp, T alpha, T beta, T* C,
           int64_t ldc) {
    const int nr = NR<T>;
    const int64_t mt = ceil_div(M, MR), nt = ceil_div(N, nr);
    const int64_t total = mt * nt;
    auto body = [&](int64_t idx) {
        const int64_t j = idx / mt, i = idx % mt;
        const int64_t m0 = i * MR, n0 = j * nr;
        const int mr = (int)(M - m0 < MR ? M - m0 : MR);
        const int64_t nc = N - n0 < nr ? N - n0 : nr;
        micro_dispatch<T>(mr, K, Ap + i * K * MR, Bp + j * K * nr, C + m0 * ldc + n0, ldc, nc,
                          alpha, beta);
    };
#ifdef _OPENMP
    const double flops = 2.0 * (double)M * (double)N * (double)K;
    const int nth = threads_for_kernels();
    if (nth > 1 && total > 1 && flops > 6.0e4 && !omp_in_parallel()) {
#pragma omp parallel for schedule(static) num_threads(nth)
        for (int64_t idx = 0; idx < total; ++idx) body(idx);
        return;
    }
#endif
    for (int64_t idx = 0; idx < total; ++idx) body(idx);
}

template <class T> T* alloc(int64_t n) {
    const size_t bytes = ((size_t)(n > 0 ? n : 1) * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
}

template <class T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == T(0) ? T(0) : beta * C[m * ldc + n];
        return;
    }
    const int64_t kc = K < KC ? K : KC;
    T* Ap = alloc<T>(packed_a_size(M, kc));
    T* Bp = alloc<T>(packed_b_size<T>(kc, N));
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t kk = K - k0 < kc ? K - k0 : kc;
        pack_a(ta, M, kk, ta ? A + k0 * lda : A + k0, lda, Ap);
        pack_b(tb, kk, N, tb ? B + k0 : B + k0 * ldb, ldb, Bp);
        tiles<T>(M, N, kk, Ap, Bp, alpha, k0 == 0 ? beta : T(1), C, ldc);
    }
    std::free(Ap);
    std::free(Bp);
}

// C = op(A) @ Bp (+ beta C), Bp packed from a [K, N] operand; ap: packed_a_size(M, K) scratch.
template <class T>
inline void gemm_pb(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bp,
                    T beta, T* C, int64_t ldc, T* ap) {
    pack_a(false, M, K, A, lda, ap);
    tiles<T>(M, N, K, ap, Bp, T(1), beta, C, ldc);
}

// ------------------------------------------------------------------ activations
template <class T> inline T sigm(T x) { return T(1) / (T(1) + std::exp(-x)); }
template <class T> inline T tanh_(T x) { return std::tanh(x); }

inline bool active(const int64_t* lengths, int64_t b, int64_t t) {
    return lengths == nullptr || t < lengths[b];
}

// ------------------------------------------------------------------ forward
template <class T> struct FwdWork {
    T *pk_hh, *pk_n, *pk_hr, *hh, *hn, *ap;
};

template <class T> int64_t fwd_layout(const DirJob<T>& j, FwdWork<T>* w) {
    const int64_t B = j.batch, H = j.hid, P = j.out;
    const int G = j.cell == (int)CellType::LSTM ? 4 : j.cell == (int)CellType::GRU ? 3 : 1;
    const bool gru_orig = j.cell == (int)CellType::GRU && !j.lbr;
    const bool proj = j.cell == (int)CellType::LSTM && P != H;
    auto round = [](int64_t n) { return (n + 15) / 16 * 16; };
    int64_t off = 0;
    int64_t s_hh = gru_orig ? packed_b_size<T>(H, 2 * H) : packed_b_size<T>(P, G * H);
    int64_t s_n = gru_orig ? packed_b_size<T>(H, H) : 0;
    int64_t s_hr = proj ? packed_b_size<T>(H, P) : 0;
    int64_t kmax = H > P ? H : P;
    int64_t sizes[6] = {s_hh, s_n, s_hr, B * G * H, B * H, packed_a_size(B, kmax)};
    T** ptrs[6] = {&w->pk_hh, &w->pk_n, &w->pk_hr, &w->hh, &w->hn, &w->ap};
    for (int i = 0; i < 6; ++i) {
        *ptrs[i] = j.work ? j.work + off : nullptr;
        off += round(sizes[i]);
    }
    return off;
}

template <class T> int64_t dir_forward_work(const DirJob<T>& j) {
    FwdWork<T> w;
    DirJob<T> c = j;
    c.work = nullptr;
    return fwd_layout(c, &w);
}

template <class T> void dir_forward(const DirJob<T>& j) {
    const int64_t TT = j.steps, B = j.batch, I = j.in, H = j.hid, P = j.out;
    const int cell = j.cell;
    const int G = cell == (int)CellType::LSTM ? 4 : cell == (int)CellType::GRU ? 3 : 1;
    const int64_t GH = G * H;
    const bool lstm = cell == (int)CellType::LSTM, gru = cell == (int)CellType::GRU;
    const bool proj = lstm && P != H;
    const bool gru_orig = gru && !j.lbr;
    const int rev = j.reverse ? 1 : 0;
    FwdWork<T> w;
    fwd_layout(j, &w);

    // 1. Input projection of every step at once: gates = x @ W_ih^T + biases.
    gemm<T>(false, true, TT * B, GH, I, T(1), j.x, I, j.w.w_ih, I, T(0), j.gates, GH);
    if (j.w.b_ih) {
        for (int64_t r = 0; r < TT * B; ++r) {
            T* g = j.gates + r * GH;
            const T* bi = j.w.b_ih;
            const T* bh = j.w.b_hh;
            // b_hh folds in here except for the n gate of the reset-after GRU.
            const int64_t fold = (gru && j.lbr) ? 2 * H : GH;
            for (int64_t k = 0; k < fold; ++k) g[k] += bi[k] + bh[k];
            for (int64_t k = fold; k < GH; ++k) g[k] += bi[k];
        }
    }
    // 2. Pack the recurrent weights once for the whole sequence.
    if (gru_orig) {
        pack_b<T>(true, H, 2 * H, j.w.w_hh, H, w.pk_hh);
        pack_b<T>(true, H, H, j.w.w_hh + 2 * H * H, H, w.pk_n);
    } else {
        pack_b<T>(true, P, GH, j.w.w_hh, P, w.pk_hh);
    }
    if (proj) pack_b<T>(true, H, P, j.w.w_hr, H, w.pk_hr);

    // 3. The recurrence.
    for (int64_t q = 0; q < TT; ++q) {
        const int64_t t = rev ? TT - 1 - q : q;
        const T* hprev = j.hbuf + (t + rev) * B * P;
        T* hnext = j.hbuf + (t + 1 - rev) * B * P;
        T* gt = j.gates + t * B * GH;
        T* yt = j.y + t * B * j.ldy;
        if (gru_orig)
            gemm_pb<T>(B, 2 * H, H, hprev, P, w.pk_hh, T(0), w.hh, 2 * H, w.ap);
        else
            gemm_pb<T>(B, GH, P, hprev, P, w.pk_hh, T(0), w.hh, GH, w.ap);

        if (lstm) {
            const T* cprev = j.cbuf + (t + rev) * B * H;
            T* cnext = j.cbuf + (t + 1 - rev) * B * H;
            const T* pi = j.peephole ? j.w.w_peep : nullptr;
            const T* pf = pi ? pi + H : nullptr;
            const T* po = pi ? pi + 2 * H : nullptr;
            for (int64_t b = 0; b < B; ++b) {
                T* g = gt + b * GH;
                const T* hh = w.hh + b * GH;
                const T* cp = cprev + b * H;
                T* cn = cnext + b * H;
                T* m = proj ? j.mbuf + (t * B + b) * H : hnext + b * P;
                if (!active(j.lengths, b, t)) {
                    for (int64_t k = 0; k < H; ++k) cn[k] = cp[k];
                    for (int64_t k = 0; k < GH; ++k) g[k] = T(0);
                    if (proj) for (int64_t k = 0; k < H; ++k) m[k] = T(0);
                    continue;
                }
                for (int64_t k = 0; k < H; ++k) {
                    T ai = g[k] + hh[k], af = g[H + k] + hh[H + k];
                    T ag = g[2 * H + k] + hh[2 * H + k], ao = g[3 * H + k] + hh[3 * H + k];
                    const T c0 = cp[k];
                    if (pi) { ai += pi[k] * c0; af += pf[k] * c0; }
                    const T f = sigm(af);
                    const T i = j.coupled ? T(1) - f : sigm(ai);
                    const T gg = tanh_(ag);
                    const T c = f * c0 + i * gg;
                    if (po) ao += po[k] * c;
                    const T o = sigm(ao);
                    g[k] = i; g[H + k] = f; g[2 * H + k] = gg; g[3 * H + k] = o;
                    cn[k] = c;
                    m[k] = o * tanh_(c);
                }
            }
            if (proj) {
                gemm_pb<T>(B, P, H, j.mbuf + t * B * H, H, w.pk_hr, T(0), hnext, P, w.ap);
            }
        } else if (gru) {
            for (int64_t b = 0; b < B; ++b) {
                T* g = gt + b * GH;
                const T* hh = w.hh + b * (gru_orig ? 2 * H : GH);
                const T* hp = hprev + b * P;
                T* ex = j.extra + (t * B + b) * H;
                if (!active(j.lengths, b, t)) {
                    for (int64_t k = 0; k < GH; ++k) g[k] = T(0);
                    for (int64_t k = 0; k < H; ++k) ex[k] = T(0);
                    continue;
                }
                for (int64_t k = 0; k < 2 * H; ++k) g[k] = sigm(g[k] + hh[k]);
                if (gru_orig) {
                    for (int64_t k = 0; k < H; ++k) ex[k] = g[k] * hp[k];   // r * h
                } else {
                    const T* bhn = j.w.b_hh ? j.w.b_hh + 2 * H : nullptr;
                    for (int64_t k = 0; k < H; ++k) {
                        const T hn = hh[2 * H + k] + (bhn ? bhn[k] : T(0));
                        ex[k] = hn;
                        g[2 * H + k] = tanh_(g[2 * H + k] + g[k] * hn);
                    }
                }
            }
            if (gru_orig) {
                gemm_pb<T>(B, H, H, j.extra + t * B * H, H, w.pk_n, T(0), w.hn, H, w.ap);
                for (int64_t b = 0; b < B; ++b) {
                    if (!active(j.lengths, b, t)) continue;
                    T* g = gt + b * GH;
                    const T* hn = w.hn + b * H;
                    for (int64_t k = 0; k < H; ++k) g[2 * H + k] = tanh_(g[2 * H + k] + hn[k]);
                }
            }
            for (int64_t b = 0; b < B; ++b) {
                if (!active(j.lengths, b, t)) continue;
                const T* g = gt + b * GH;
                const T* hp = hprev + b * P;
                T* hn = hnext + b * P;
                for (int64_t k = 0; k < H; ++k) {
                    const T z = g[H + k];
                    hn[k] = (T(1) - z) * g[2 * H + k] + z * hp[k];
                }
            }
        } else {  // plain RNN
            const bool relu = cell == (int)CellType::RNN_RELU;
            for (int64_t b = 0; b < B; ++b) {
                if (!active(j.lengths, b, t)) continue;
                const T* g = gt + b * GH;
                const T* hh = w.hh + b * GH;
                T* hn = hnext + b * P;
                for (int64_t k = 0; k < H; ++k) {
                    const T a = g[k] + hh[k];
                    hn[k] = relu ? (a > T(0) ? a : T(0)) : tanh_(a);
                }
            }
        }
        // Inactive rows carry their state; every row writes its output.
        for (int64_t b = 0; b < B; ++b) {
            T* hn = hnext + b * P;
            T* yb = yt + b * j.ldy;
            if (!active(j.lengths, b, t)) {
                std::memcpy(hn, hprev + b * P, sizeof(T) * P);
                for (int64_t k = 0; k < P; ++k) yb[k] = T(0);
            } else {
                std::memcpy(yb, hn, sizeof(T) * P);
            }
        }
    }
}

// ------------------------------------------------------------------ backward
template <class T> struct BwdWork {
    T *pk_hh, *pk_n, *pk_hr, *dm, *tmp, *dhd, *ap;
};

template <class T> int64_t bwd_layout(const DirBackJob<T>& bj, T* base, BwdWork<T>* w) {
    const DirJob<T>& j = bj.f;
    const int64_t B = j.batch, H = j.hid, P = j.out;
    const int G = j.cell == (int)CellType::LSTM ? 4 : j.cell == (int)CellType::GRU ? 3 : 1;
    const bool gru_orig = j.cell == (int)CellType::GRU && !j.lbr;
    const bool proj = j.cell == (int)CellType::LSTM && P != H;
    auto round = [](int64_t n) { return (n + 15) / 16 * 16; };
    int64_t s_hh = gru_orig ? packed_b_size<T>(2 * H, H) : packed_b_size<T>(G * H, P);
    int64_t s_n = gru_orig ? packed_b_size<T>(H, H) : 0;
    int64_t s_hr = proj ? packed_b_size<T>(P, H) : 0;
    int64_t kmax = G * H > P ? G * H : P;
    int64_t wmax = H > P ? H : P;
    int64_t sizes[7] = {s_hh, s_n, s_hr, B * H, B * wmax, B * wmax, packed_a_size(B, kmax)};
    T** ptrs[7] = {&w->pk_hh, &w->pk_n, &w->pk_hr, &w->dm, &w->tmp, &w->dhd, &w->ap};
    int64_t off = 0;
    for (int i = 0; i < 7; ++i) {
        *ptrs[i] = base ? base + off : nullptr;
        off += round(sizes[i]);
    }
    return off;
}

template <class T> int64_t dir_backward_work(const DirBackJob<T>& j) {
    BwdWork<T> w;
    return bwd_layout(j, (T*)nullptr, &w);
}

template <class T> void dir_backward(const DirBackJob<T>& bj) {
    const DirJob<T>& j = bj.f;
    const int64_t TT = j.steps, B = j.batch, I = j.in, H = j.hid, P = j.out;
    const int cell = j.cell;
    const int G = cell == (int)CellType::LSTM ? 4 : cell == (int)CellType::GRU ? 3 : 1;
    const int64_t GH = G * H;
    const bool lstm = cell == (int)CellType::LSTM, gru = cell == (int)CellType::GRU;
    const bool proj = lstm && P != H;
    const bool gru_orig = gru && !j.lbr;
    const int rev = j.reverse ? 1 : 0;
    BwdWork<T> w;
    bwd_layout(bj, bj.work, &w);
    T* dh = bj.dh;
    T* dc = bj.dc;
    T* dgh = (gru && j.lbr) ? bj.dgh : bj.dgx;

    if (gru_orig) {
        pack_b<T>(false, 2 * H, H, j.w.w_hh, H, w.pk_hh);
        pack_b<T>(false, H, H, j.w.w_hh + 2 * H * H, H, w.pk_n);
    } else {
        pack_b<T>(false, GH, P, j.w.w_hh, P, w.pk_hh);
    }
    if (proj) pack_b<T>(false, P, H, j.w.w_hr, H, w.pk_hr);

    for (int64_t q = TT - 1; q >= 0; --q) {
        const int64_t t = rev ? TT - 1 - q : q;
        const T* hprev = j.hbuf + (t + rev) * B * P;
        const T* hnext = j.hbuf + (t + 1 - rev) * B * P;
        const T* gt = j.gates + t * B * GH;
        T* dgt = bj.dgx + t * B * GH;
        T* dght = dgh + t * B * GH;
        // dh += dy for the rows that produced an output at this step
        if (bj.dy) {
            for (int64_t b = 0; b < B; ++b) {
                if (!active(j.lengths, b, t)) continue;
                const T* dyb = bj.dy + (t * B + b) * bj.ldy;
                T* dhb = dh + b * P;
                for (int64_t k = 0; k < P; ++k) dhb[k] += dyb[k];
            }
        }
        if (lstm) {
            const T* cprev = j.cbuf + (t + rev) * B * H;
            const T* cnext = j.cbuf + (t + 1 - rev) * B * H;
            const T* pi = j.peephole ? j.w.w_peep : nullptr;
            const T* pf = pi ? pi + H : nullptr;
            const T* po = pi ? pi + 2 * H : nullptr;
            const T* dm = dh;
            if (proj) {
                T* dhs = bj.dhs + t * B * P;
                for (int64_t b = 0; b < B; ++b) {
                    if (active(j.lengths, b, t))
                        std::memcpy(dhs + b * P, dh + b * P, sizeof(T) * P);
                    else
                        for (int64_t k = 0; k < P; ++k) dhs[b * P + k] = T(0);
                }
                gemm_pb<T>(B, H, P, dhs, P, w.pk_hr, T(0), w.dm, H, w.ap);
                dm = w.dm;
            }
            for (int64_t b = 0; b < B; ++b) {
                T* da = dgt + b * GH;
                if (!active(j.lengths, b, t)) {
                    for (int64_t k = 0; k < GH; ++k) da[k] = T(0);
                    continue;
                }
                const T* g = gt + b * GH;
                const T* dmb = dm + b * (proj ? H : P);
                const T* cp = cprev + b * H;
                const T* cn = cnext + b * H;
                T* dcb = dc + b * H;
                for (int64_t k = 0; k < H; ++k) {
                    const T i = g[k], f = g[H + k], gg = g[2 * H + k], o = g[3 * H + k];
                    const T th = tanh_(cn[k]);
                    const T dao = dmb[k] * th * o * (T(1) - o);
                    T dcv = dcb[k] + dmb[k] * o * (T(1) - th * th);
                    if (po) dcv += dao * po[k];
                    const T dag = dcv * i * (T(1) - gg * gg);
                    T dai, daf;
                    if (j.coupled) {
                        dai = T(0);
                        daf = dcv * (cp[k] - gg) * f * (T(1) - f);
                    } else {
                        dai = dcv * gg * i * (T(1) - i);
                        daf = dcv * cp[k] * f * (T(1) - f);
                    }
                    T dcp = dcv * f;
                    if (pi) dcp += dai * pi[k] + daf * pf[k];
                    dcb[k] = dcp;
                    da[k] = dai; da[H + k] = daf; da[2 * H + k] = dag; da[3 * H + k] = dao;
                }
            }
            gemm_pb<T>(B, P, GH, dgt, GH, w.pk_hh, T(0), w.tmp, P, w.ap);
            for (int64_t b = 0; b < B; ++b)
                if (active(j.lengths, b, t)) std::memcpy(dh + b * P, w.tmp + b * P, sizeof(T) * P);
        } else if (gru) {
            for (int64_t b = 0; b < B; ++b) {
                T* da = dgt + b * GH;
                T* dah = dght + b * GH;
                if (!active(j.lengths, b, t)) {
                    for (int64_t k = 0; k < GH; ++k) da[k] = T(0);
                    if (dah != da) for (int64_t k = 0; k < GH; ++k) dah[k] = T(0);
                    continue;
                }
                const T* g = gt + b * GH;
                const T* hp = hprev + b * P;
                const T* ex = j.extra + (t * B + b) * H;
                const T* dhb = dh + b * P;
                T* dhd = w.dhd + b * H;
                for (int64_t k = 0; k < H; ++k) {
                    const T r = g[k], z = g[H + k], n = g[2 * H + k];
                    const T dn = dhb[k] * (T(1) - z);
                    const T dz = dhb[k] * (hp[k] - n);
                    const T dan = dn * (T(1) - n * n);
                    da[H + k] = dz * z * (T(1) - z);
                    da[2 * H + k] = dan;
                    dhd[k] = dhb[k] * z;
                    if (!gru_orig) {
                        const T dr = dan * ex[k];
                        da[k] = dr * r * (T(1) - r);
                        dah[k] = da[k];
                        dah[H + k] = da[H + k];
                        dah[2 * H + k] = dan * r;
                    }
                }
            }
            if (gru_orig) {
                // d(r*h) = da_n @ W_hn; then the r gate and the direct path.
                gemm_pb<T>(B, H, H, dgt + 2 * H, GH, w.pk_n, T(0), w.tmp, H, w.ap);
                for (int64_t b = 0; b < B; ++b) {
                    if (!active(j.lengths, b, t)) continue;
                    T* da = dgt + b * GH;
                    const T* g = gt + b * GH;
                    const T* hp = hprev + b * P;
                    const T* drh = w.tmp + b * H;
                    T* dhd = w.dhd + b * H;
                    for (int64_t k = 0; k < H; ++k) {
                        const T r = g[k];
                        da[k] = drh[k] * hp[k] * r * (T(1) - r);
                        dhd[k] += drh[k] * r;
                    }
                }
                gemm_pb<T>(B, H, 2 * H, dgt, GH, w.pk_hh, T(0), w.tmp, H, w.ap);
            } else {
                gemm_pb<T>(B, P, GH, dght, GH, w.pk_hh, T(0), w.tmp, P, w.ap);
            }
            for (int64_t b = 0; b < B; ++b) {
                if (!active(j.lengths, b, t)) continue;
                T* dhb = dh + b * P;
                const T* tb = w.tmp + b * P;
                const T* dhd = w.dhd + b * H;
                for (int64_t k = 0; k < H; ++k) dhb[k] = tb[k] + dhd[k];
            }
        } else {
            const bool relu = cell == (int)CellType::RNN_RELU;
            for (int64_t b = 0; b < B; ++b) {
                T* da = dgt + b * GH;
                if (!active(j.lengths, b, t)) {
                    for (int64_t k = 0; k < H; ++k) da[k] = T(0);
                    continue;
                }
                const T* hn = hnext + b * P;
                const T* dhb = dh + b * P;
                for (int64_t k = 0; k < H; ++k)
                    da[k] = relu ? (hn[k] > T(0) ? dhb[k] : T(0)) : dhb[k] * (T(1) - hn[k] * hn[k]);
            }
            gemm_pb<T>(B, P, GH, dgt, GH, w.pk_hh, T(0), w.tmp, P, w.ap);
            for (int64_t b = 0; b < B; ++b)
                if (active(j.lengths, b, t)) std::memcpy(dh + b * P, w.tmp + b * P, sizeof(T) * P);
        }
    }

    // Weight gradients: one GEMM each over all steps.
    const int64_t R = TT * B;
    const T* Hprev = j.hbuf + rev * B * P;   // states entering steps 0..T-1, time order
    gemm<T>(true, false, GH, I, R, T(1), bj.dgx, GH, j.x, I, T(1), bj.g.w_ih, I);
    if (gru_orig) {
        gemm<T>(true, false, 2 * H, H, R, T(1), bj.dgx, GH, Hprev, P, T(1), bj.g.w_hh, H);
        gemm<T>(true, false, H, H, R, T(1), bj.dgx + 2 * H, GH, j.extra, H, T(1),
                bj.g.w_hh + 2 * H * H, H);
    } else {
        gemm<T>(true, false, GH, P, R, T(1), dgh, GH, Hprev, P, T(1), bj.g.w_hh, P);
    }
    if (bj.g.b_ih) {
        for (int64_t r = 0; r < R; ++r) {
            const T* a = bj.dgx + r * GH;
            const T* ah = dgh + r * GH;
            for (int64_t k = 0; k < GH; ++k) { bj.g.b_ih[k] += a[k]; bj.g.b_hh[k] += ah[k]; }
        }
    }
    if (proj) gemm<T>(true, false, P, H, R, T(1), bj.dhs, P, j.mbuf, H, T(1), bj.g.w_hr, H);
    if (lstm && j.peephole) {
        T* gp = bj.g.w_peep;
        for (int64_t t = 0; t < TT; ++t) {
            const T* cprev = j.cbuf + (t + rev) * B * H;
            const T* cnext = j.cbuf + (t + 1 - rev) * B * H;
            for (int64_t b = 0; b < B; ++b) {
                const T* da = bj.dgx + (t * B + b) * GH;
                for (int64_t k = 0; k < H; ++k) {
                    gp[k] += da[k] * cprev[b * H + k];
                    gp[H + k] += da[H + k] * cprev[b * H + k];
                    gp[2 * H + k] += da[3 * H + k] * cnext[b * H + k];
                }
            }
        }
    }
    gemm<T>(false, false, R, I, GH, T(1), bj.dgx, GH, j.w.w_ih, I,
            bj.dx_accumulate ? T(1) : T(0), bj.dx, I);
}

}  // namespace

extern const KernelTable table;
const KernelTable table = {
    RNNCORE_ISA_NAME,
    {&gemm<float>, &dir_forward_work<float>, &dir_forward<float>, &dir_backward_work<float>,
     &dir_backward<float>},
    {&gemm<double>, &dir_forward_work<double>, &dir_forward<double>,
     &dir_backward_work<double>, &dir_backward<double>},
};

}  // namespace RNNCORE_ISA_NS
}  // namespace rnncore
