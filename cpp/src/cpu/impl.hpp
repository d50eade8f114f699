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
#include <time.h>
#include <sched.h>
#include <unistd.h>

#include "kernels.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE2__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rnncore {
namespace RNNCORE_ISA_NS {
namespace {

constexpr int VB = RNNCORE_VEC_BYTES;

template <class T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(VB))); };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(VB))); };

// Full unrolling of the micro-kernel's loops over its rows (see micro). Not in sanitizer
// builds, where it tripled the compile time of a kernel unit (150 s instead of 51).
#if defined(__SANITIZE_ADDRESS__)
#define RNNCORE_UNROLL_ROWS
#else
#define RNNCORE_UNROLL_ROWS _Pragma("GCC unroll 16")
#endif

template <class T> constexpr int VL = VB / (int)sizeof(T);   // lanes per register
template <class T> constexpr int NR = 2 * VL<T>;             // columns per B panel
// Rows per A panel: the micro-kernel keeps 2 * MR accumulators. AVX-512 has 32 registers,
// so 12 rows (24 accumulators, 2 B vectors, 1 broadcast); measured on a Xeon with AVX-512:
// 1536^3 sgemm 258 -> 285 GFLOP/s, LSTM T=100 B=64 H=512 81 -> 75 ms (6 rows before; 14
// rows made GCC spill). AVX2 has 16 registers: 6 rows (12 accumulators).
constexpr int MR = VB >= 64 ? 12 : VB >= 32 ? 6 : 4;
constexpr int64_t KC = 384;                                   // K block of the big GEMM

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// bfloat16: the upper half of a float32. For inference the recurrent weights may be packed in
// it (DirJob::bf16): half the bytes streamed from the cache at every step, while h, the
// products and the sums stay float32 (each bf16 weight widens to float32 exactly, so the result
// is the float32 computation with the weights rounded to bf16, to float32 rounding).
enum class bf16 : uint16_t {};
template <class A, class B> struct same_type { static constexpr bool value = false; };
template <class A> struct same_type<A, A> { static constexpr bool value = true; };
// float32 -> bf16, round to nearest even (as numpy_ref.round_bf16); NaN stays a (quiet) NaN.
inline bf16 round_bf16(float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16((uint16_t)((u >> 16) | 0x40u));
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16((uint16_t)(u >> 16));
}
// A packed weight element from a T: itself, or rounded to bf16.
template <class W> struct WConv { template <class T> static W from(T x) { return x; } };
template <> struct WConv<bf16> { static bf16 from(float x) { return round_bf16(x); } };
// Where column c (0 <= c < 2L) of a k row of a packed panel lies in the row. T: in order. bf16:
// the row is one register of L 32-bit words, word i = column L+i in its high half and column
// i in its low half, so load_w2 widens both with one load, a shift and a mask (no shuffles:
// a widening move per half was 40% slower at batch 1 on AVX2).
template <class T, class W> inline int64_t panel_col(int64_t c) {
    constexpr int L = VL<T>;
    if constexpr (same_type<W, T>::value) return c;
    else return c < L ? 2 * c : 2 * (c - L) + 1;
}
// The two registers of one k row of a packed panel (2L elements from p), widened to T.
template <class T> inline void load_w2(const T* p, typename Vec<T>::type& b0, typename Vec<T>::type& b1) {
    std::memcpy(&b0, p, sizeof b0);
    std::memcpy(&b1, p + VL<T>, sizeof b1);
}
inline void load_w2(const bf16* p, typename Vec<float>::type& b0, typename Vec<float>::type& b1) {
    typedef uint32_t Word __attribute__((vector_size(VB)));
    Word u;
    std::memcpy(&u, p, sizeof u);
#if defined(__GNUC__) && defined(__SSE2__)
    // One load: GCC would otherwise fold the load into the mask's AND as well, reading the
    // row twice (two loads per FMA pair, as many as float32 rows take).
    __asm__("" : "+x"(u));
#endif
    const Word lo = u << 16, hi = u & 0xffff0000u;
    std::memcpy(&b0, &lo, sizeof b0);
    std::memcpy(&b1, &hi, sizeof b1);
}

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

template <class T> inline int64_t packed_b_size(int64_t K, int64_t N) {
    return ceil_div(N, NR<T>) * NR<T> * K;
}
inline int64_t packed_a_size(int64_t M, int64_t K) { return ceil_div(M, MR) * MR * K; }

constexpr int64_t PACK_AHEAD = 8;    // rows of the source the packing loops prefetch ahead
constexpr int64_t PACK_AHEAD_BYTES = 2048;   // pack_b: at least this far ahead, 2 rows at least
constexpr int64_t TKB = 32;   // pack_b_rows: steps of k a pass (16 and 64 measured alike)
// Packs op(B)[k, n] = B[row(n) * ldb + k] for a gathered list of rows (a thread's slice of
// the gates of W_hh, say; pack_b's transposed case: every row in order), in pack_b's panel
// layout. Each source row is a column of a panel: TKB steps of k at a time, so that the rows
// of the panel being written (TKB x NR, a few KB) stay in L1 until they are whole (a column at
// a time over all of K wrote each line NR times, 4 bytes at a time, after it had left L1 for a
// long panel). One process, alternating rounds, C = A B^T: M=64 N=4096 K=1024 97 -> 180
// GFLOP/s, M=200 N=1024 K=1024 130 -> 210, M=1600 N=3072 K=1024 275 -> 290; the input
// projection of a GRU training step (T=50 B=32 I=H=1024, X packed this way 64 rows at a time)
// 0.974.
// W: the packed element type (T, or bf16 for float32 weights streamed at half the bytes).
template <class T, class RowFn, class W>
void pack_b_rows(int64_t K, int64_t N, const T* B, int64_t ldb, RowFn row, W* out) {
    const int nr = NR<T>;
    const int64_t panels = ceil_div(N, nr);
    for (int64_t p = 0; p < panels; ++p) {
        W* dst = out + p * K * nr;
        const int64_t n0 = p * nr;
        const int64_t nn = N - n0 < nr ? N - n0 : nr;
        for (int64_t k0 = 0; k0 < K; k0 += TKB) {
            const int64_t kb = K - k0 < TKB ? K - k0 : TKB;
            W* d = dst + k0 * nr;
            for (int64_t c = 0; c < nn; ++c) {
                const T* src = B + row(n0 + c) * ldb + k0;
                const int64_t pc = panel_col<T, W>(c);
                for (int64_t k = 0; k < kb; ++k) d[k * nr + pc] = WConv<W>::from(src[k]);
            }
            for (int64_t k = 0; k < kb; ++k)
                for (int64_t c = nn; c < nr; ++c) d[k * nr + panel_col<T, W>(c)] = WConv<W>::from(T(0));
        }
    }
}

// op(B)[k, n] = tb ? B[n*ldb + k] : B[k*ldb + n]
template <class T>
void pack_b(bool tb, int64_t K, int64_t N, const T* B, int64_t ldb, T* out) {
    const int nr = NR<T>;
    const int64_t panels = ceil_div(N, nr);
    if (tb) {   // each row of B a column of a panel
        pack_b_rows<T>(K, N, B, ldb, [](int64_t n) { return n; }, out);
        return;
    }
    // Row by row across all the panels: each source row is read left to right once (not a
    // line or two of it per panel). The rows lie a row of B apart, on a different page
    // nearly every time, which the hardware prefetchers do not follow; so the row at least
    // PACK_AHEAD_BYTES on is asked for, line by line, into L2 (more lines in flight than
    // L1's fill buffers hold), and each panel's line it is copied to 2 * PACK_AHEAD rows on
    // with write intent (a packed block the other threads read in the last K block is shared with
    // their caches, and each store waited for its invalidation: one 384 x 384 block from
    // memory 77 -> 30 us). Panel by panel before, with the row 8 on into L1: a training step
    // of RNN T=50 B=32 I=H=1024 0.981 of the time (one process, alternating rounds), its
    // packing of W_hh 0.64 (backward) and 0.82 (forward), its weight-gradient GEMM 0.98.
    const int64_t rowb = N * (int64_t)sizeof(T);
    const int64_t lines = ceil_div(rowb, 64) + 1;
    const int64_t ahead = PACK_AHEAD_BYTES / rowb > 2 ? PACK_AHEAD_BYTES / rowb : 2;
    const int64_t full = N / nr;
    for (int64_t k = 0; k < K; ++k) {
        const T* src = B + k * ldb;
        if (k + ahead < K)
            for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(src + ahead * ldb + l * (64 / (int64_t)sizeof(T)), 0, 2);
        for (int64_t p = 0; p < full; ++p) {
            T* d = out + p * K * nr + k * nr;
            if (k + 2 * PACK_AHEAD < K) {
                __builtin_prefetch(d + 2 * PACK_AHEAD * nr, 1, 3);
                if (nr * sizeof(T) > 64) __builtin_prefetch(d + 2 * PACK_AHEAD * nr + 64 / sizeof(T), 1, 3);
            }
            std::memcpy(d, src + p * nr, sizeof(T) * nr);
        }
        if (full < panels) {
            T* d = out + full * K * nr + k * nr;
            int64_t c = 0;
            for (; c < N - full * nr; ++c) d[c] = src[full * nr + c];
            for (; c < nr; ++c) d[c] = T(0);
        }
    }
}

// op(A)[m, k] = ta ? A[k*lda + m] : A[m*lda + k]; with ta, the rows m >= ms from A2 (same
// layout: see gemm_parts)
template <class T>
void pack_a(bool ta, int64_t M, int64_t K, const T* A, int64_t lda, T* out, const T* A2 = nullptr,
            int64_t ms = 0) {
    const int64_t panels = ceil_div(M, MR);
    const int64_t full = M / MR;            // panels with all MR rows
    if (ta) {
        if (!A2) ms = M;
        // op(A) = A^T: row k of A holds column k of every panel. Read each row once, left to
        // right, and scatter it to the panels (each written as a sequential stream).
        for (int64_t k = 0; k < K; ++k) {
            const T* src = A + k * lda;
            const T* src2 = A2 ? A2 + k * lda : src;
            if (k + PACK_AHEAD < K)   // as in pack_b: the row PACK_AHEAD rows on (M=256: 1.0 -> 0.5 ms of a GEMM)
                for (int64_t m = 0; m < M; m += 64 / (int64_t)sizeof(T))
                    __builtin_prefetch((m < ms ? src : src2) + PACK_AHEAD * lda + m, 0, 3);
            for (int64_t p = 0; p < full; ++p) {
                const int64_t m0 = p * MR;
                if (m0 + MR <= ms || m0 >= ms) {   // the panel from one source
                    const T* sp = (m0 < ms ? src : src2) + m0;
                    for (int r = 0; r < MR; ++r) out[p * K * MR + k * MR + r] = sp[r];
                } else {
                    for (int r = 0; r < MR; ++r) out[p * K * MR + k * MR + r] = (m0 + r < ms ? src : src2)[m0 + r];
                }
            }
            if (full < panels) {
                const int64_t m0 = full * MR;
                for (int64_t r = 0; r < MR; ++r)
                    out[full * K * MR + k * MR + r] = m0 + r < M ? (m0 + r < ms ? src : src2)[m0 + r] : T(0);
            }
        }
        return;
    }
    for (int64_t p = 0; p < panels; ++p) {
        T* dst = out + p * K * MR;
        const int64_t m0 = p * MR;
        const int64_t mm = M - m0 < MR ? M - m0 : MR;
        if (mm == MR) {          // full panel: fixed-size inner loop (unrolled, contiguous stores)
            const T* src = A + m0 * lda;
            for (int64_t k = 0; k < K; ++k)
                for (int r = 0; r < MR; ++r) dst[k * MR + r] = src[r * lda + k];
            continue;
        }
        for (int64_t r = 0; r < mm; ++r) {
            const T* src = A + (m0 + r) * lda;
            for (int64_t k = 0; k < K; ++k) dst[k * MR + r] = src[k];
        }
        for (int64_t r = mm; r < MR; ++r)
            for (int64_t k = 0; k < K; ++k) dst[k * MR + r] = T(0);
    }
}

#if RNNCORE_VEC_BYTES == 64 && defined(__AVX512F__) && defined(__GNUC__) && defined(__x86_64__)
// The float32 12-row tile with A read in place (the per-step products' W_hh rows, a
// non-transposed A of the big GEMM), its k loop in assembly (AVX-512). GCC's loop broadcasts
// every row of A into one register and advances three row pointers a step; here six
// registers take turns and the loop takes two steps of k a turn (displacements for the
// second). Prefetches as in the C loop. One process, alternating rounds against GCC's loop,
// two threads: C = A B^T M=1600 N=3072 K=1024 0.96 of the time, A B M=6400 N=512 K=768 0.95,
// 1536^3 0.97-0.98. (The same for a packed A, the transposed-A weight gradient, was
// 1.004-1.008: not taken.) The accumulators are outputs only, zeroed here (an in/out operand
// counts twice against GCC's limit of 30 operands); the pointers and the count are copied
// into scratch registers.
#define RNNCORE_ASM_MICRO 1
#define RNNCORE_FMA2(addr, bc, i, j)                                                        \
    "vbroadcastss " addr ", %%zmm" #bc "\n\t"                                                \
    "vfmadd231ps %%zmm" #bc ", %%zmm24, %" #i "\n\t"                                         \
    "vfmadd231ps %%zmm" #bc ", %%zmm25, %" #j "\n\t"
#define RNNCORE_ASM_ZERO2(i, j) "vpxord %" #i ", %" #i ", %" #i "\n\t" "vpxord %" #j ", %" #j ", %" #j "\n\t"
#define RNNCORE_ASM_ZERO                                                                      \
    RNNCORE_ASM_ZERO2(0, 1) RNNCORE_ASM_ZERO2(2, 3) RNNCORE_ASM_ZERO2(4, 5) RNNCORE_ASM_ZERO2(6, 7) \
    RNNCORE_ASM_ZERO2(8, 9) RNNCORE_ASM_ZERO2(10, 11) RNNCORE_ASM_ZERO2(12, 13)                  \
    RNNCORE_ASM_ZERO2(14, 15) RNNCORE_ASM_ZERO2(16, 17) RNNCORE_ASM_ZERO2(18, 19)                \
    RNNCORE_ASM_ZERO2(20, 21) RNNCORE_ASM_ZERO2(22, 23)
#define RNNCORE_ASM_ACC(acc0, acc1)                                                           \
    "=v"(acc0[0]), "=v"(acc1[0]), "=v"(acc0[1]), "=v"(acc1[1]), "=v"(acc0[2]), "=v"(acc1[2]),   \
    "=v"(acc0[3]), "=v"(acc1[3]), "=v"(acc0[4]), "=v"(acc1[4]), "=v"(acc0[5]), "=v"(acc1[5]),   \
    "=v"(acc0[6]), "=v"(acc1[6]), "=v"(acc0[7]), "=v"(acc1[7]), "=v"(acc0[8]), "=v"(acc1[8]),   \
    "=v"(acc0[9]), "=v"(acc1[9]), "=v"(acc0[10]), "=v"(acc1[10]), "=v"(acc0[11]), "=v"(acc1[11])
#define RNNCORE_ASM_CLOBBER "r8", "r9", "r10", "r11", "r12", "r13", "xmm24", "xmm25", "xmm26", \
                            "xmm27", "xmm28", "xmm29", "xmm30", "xmm31", "cc", "memory"
// r8: a (rows 0-4), r11: row 5, r12: row 10, r10: 3 rows, r9: b, r13: pairs of k steps left.
// B: 128 steps of k ahead into L2, 16 into L1 (without the latter: 1.03-1.06 of the time).
// One step of k: B's row (b + boff bytes) and its prefetches (pf2: into L2, pf1a/b: into
// L1), A's column d bytes on from each row pointer.
#define RNNCORE_ASM_KSTEP(d, boff, boff2, pf2, pf1a, pf1b)                                    \
    "prefetcht1 " pf2 "(%%r9)\n\t" "prefetcht0 " pf1a "(%%r9)\n\t" "prefetcht0 " pf1b "(%%r9)\n\t" \
    "vmovups " boff "(%%r9), %%zmm24\n\t" "vmovups " boff2 "(%%r9), %%zmm25\n\t"             \
    RNNCORE_FMA2(d "(%%r8)", 26, 0, 1) RNNCORE_FMA2(d "(%%r8,%[ld],1)", 27, 2, 3)             \
    RNNCORE_FMA2(d "(%%r8,%[ld],2)", 28, 4, 5) RNNCORE_FMA2(d "(%%r8,%%r10,1)", 29, 6, 7)     \
    RNNCORE_FMA2(d "(%%r8,%[ld],4)", 30, 8, 9) RNNCORE_FMA2(d "(%%r11)", 31, 10, 11)          \
    RNNCORE_FMA2(d "(%%r11,%[ld],1)", 26, 12, 13) RNNCORE_FMA2(d "(%%r11,%[ld],2)", 27, 14, 15) \
    RNNCORE_FMA2(d "(%%r11,%%r10,1)", 28, 16, 17) RNNCORE_FMA2(d "(%%r11,%[ld],4)", 29, 18, 19) \
    RNNCORE_FMA2(d "(%%r12)", 30, 20, 21) RNNCORE_FMA2(d "(%%r12,%[ld],1)", 31, 22, 23)
typedef float V16f __attribute__((vector_size(64)));
// row r of A at a + r * lda (elements)
__attribute__((always_inline)) inline void micro12_asm_inplace(int64_t K, const float* a, int64_t lda, const float* b,
                                                               V16f (&acc0)[12], V16f (&acc1)[12]) {
    __asm__ volatile(
        RNNCORE_ASM_ZERO
        "mov %[a], %%r8\n\t" "mov %[b], %%r9\n\t" "mov %[k], %%r13\n\t"
        "lea (%[ld],%[ld],2), %%r10\n\t"     // 3 rows
        "lea (%%r8,%[ld],4), %%r11\n\t"
        "add %[ld], %%r11\n\t"               // row 5
        "lea (%%r11,%[ld],4), %%r12\n\t"
        "add %[ld], %%r12\n\t"               // row 10
        "shr $1, %%r13\n\t"
        "jz 2f\n\t"
        "1:\n\t"
        RNNCORE_ASM_KSTEP("", "0", "64", "16384", "2048", "2112")
        RNNCORE_ASM_KSTEP("4", "128", "192", "16512", "2176", "2240")
        "add $8, %%r8\n\t" "add $8, %%r11\n\t" "add $8, %%r12\n\t"
        "add $256, %%r9\n\t" "dec %%r13\n\t" "jnz 1b\n\t"
        "2:\n\t"
        "test $1, %[k]\n\t"   // an odd K's last step
        "jz 3f\n\t"
        RNNCORE_ASM_KSTEP("", "0", "64", "16384", "2048", "2112")
        "3:"
        : RNNCORE_ASM_ACC(acc0, acc1)
        : [a] "r"(a), [b] "r"(b), [k] "r"(K), [ld] "r"(lda * (int64_t)sizeof(float))
        : RNNCORE_ASM_CLOBBER);
}
#endif

// Kept out of line: inlined into a large caller, GCC may run out of registers for the two B
// vectors and re-load them from memory for every row (measured 25% slower on AVX2).
// a: packed (element (r, k) at a[k * MR + r]) or, with inplace, a plain row-major block read
// where it lies (a[r * lda + k]: the per-step products, whose few rows of A are already in L1).
// b: packed elements of type W (T, or bf16 widened as loaded: load_w2).
template <class T, int mr, bool inplace = false, class W = T, bool PF = false>
__attribute__((noinline)) void micro(int64_t K, const T* __restrict a, const W* __restrict b, T* __restrict c,
                  int64_t ldc, int64_t ncols, T alpha, T beta, int64_t lda = 0,
                  const char* pf = nullptr, int64_t pfq = 0) {
    typedef typename Vec<T>::type V;
    constexpr int L = VL<T>;
    V acc0[mr], acc1[mr];
RNNCORE_UNROLL_ROWS
    for (int r = 0; r < mr; ++r) { acc0[r] = V{} ; acc1[r] = V{}; }
#ifdef RNNCORE_ASM_MICRO
    if constexpr (mr == 12 && inplace && same_type<T, float>::value && same_type<W, float>::value && !PF) {
        if (K > 0) micro12_asm_inplace(K, a, lda, b, acc0, acc1);
    } else
#endif
    for (int64_t k = 0; k < K; ++k) {
        V b0, b1;
        // B streams from L3 or memory when a thread's weight slice is larger than its L2
        // (the per-step products of large layers): ask for it well ahead of use. And from L2
        // into L1 a few steps of k ahead, both of its lines (in the big GEMM the B panel is
        // read from L2 for every row tile; one core, M=1600 N=4096 K=1024: 151 -> 158
        // GFLOP/s, 1536^3 152 -> 156), where the rows are enough to hide the two extra loads
        // (a 4-row tile has 8 FMAs a step for 6 loads: LSTM T=100 B=16 H=256, 16 = 12 + 4
        // rows, 4.95 -> 5.08 ms with them).
        __builtin_prefetch(b + (k + 128) * 2 * L, 0, 2);
        if constexpr (mr >= 8) {
            __builtin_prefetch(b + (k + 16) * 2 * L, 0, 3);
            if constexpr (2 * L * sizeof(T) > 64) __builtin_prefetch(b + (k + 16) * 2 * L + L, 0, 3);
        }
        if constexpr (PF) {   // another panel into the L2: pfq / 256 bytes a step of k (gemm_pb's stream)
            const int64_t off = (k * pfq) >> 8;
            __builtin_prefetch(pf + off, 0, 2);
            if (pfq > 64 * 256) __builtin_prefetch(pf + off + 64, 0, 2);
        }
        load_w2(b + k * 2 * L, b0, b1);
        for (int r = 0; r < mr; ++r) {
            const T av = inplace ? a[r * lda + k] : a[k * MR + r];
            acc0[r] += av * b0;
            acc1[r] += av * b1;
        }
    }
    // Every loop over the rows is unrolled: one that is not indexes the accumulator arrays by
    // a variable, and GCC then keeps them in memory around the k loop (a 1.5 KB memset on
    // entry and a spill of every accumulator on exit, for every tile).
    if (alpha == T(1) && ncols == 2 * L) {          // whole tile: vector stores
        if (beta == T(0)) {
RNNCORE_UNROLL_ROWS
            for (int r = 0; r < mr; ++r) {
                std::memcpy(c + r * ldc, &acc0[r], sizeof(V));
                std::memcpy(c + r * ldc + L, &acc1[r], sizeof(V));
            }
            return;
        }
RNNCORE_UNROLL_ROWS
        for (int r = 0; r < mr; ++r) {
            T* cr = c + r * ldc;
            V v0 = acc0[r], v1 = acc1[r];
            if (beta != T(0)) {
                V c0, c1;
                std::memcpy(&c0, cr, sizeof(V));
                std::memcpy(&c1, cr + L, sizeof(V));
                v0 += beta * c0;
                v1 += beta * c1;
            }
            std::memcpy(cr, &v0, sizeof(V));
            std::memcpy(cr + L, &v1, sizeof(V));
        }
        return;
    }
RNNCORE_UNROLL_ROWS
    for (int r = 0; r < mr; ++r) {
        T tmp[2 * L];
        const V v0 = acc0[r], v1 = acc1[r];
        for (int i = 0; i < L; ++i) { tmp[i] = v0[i]; tmp[L + i] = v1[i]; }
        T* cr = c + r * ldc;
        if (beta == T(0)) {
            for (int64_t j = 0; j < ncols; ++j) cr[j] = alpha * tmp[j];
        } else {
            for (int64_t j = 0; j < ncols; ++j) cr[j] = alpha * tmp[j] + beta * cr[j];
        }
    }
}

// mr rows against NP consecutive panels: 2*NP*mr independent accumulators, times KS: the k
// steps go round KS sets of them, summed at the end, so that a product of few panels (a
// small layer's W_hh slice at batch 1: 2 accumulators a panel) is not bound by the latency
// of one chain of K dependent FMAs (4 cycles each) but by the FMA ports (2 a cycle).
// A is read in place: element (r, k) at a[r * ars + k * aks] (packed: ars = 1, aks = MR;
// a plain row-major matrix: ars = lda, aks = 1), so small batches need no packing.
// With SR > 0, side() runs after every SR steps of k (the batch-1 product's companion: a k-step
// of the next block's input projection, product_with_piece below); the sums are the same.
struct NoSide { void operator()() const {} };
template <class T, int mr, int NP, class W = T, int KS = 1, int SR = 0, class Side = NoSide>
inline void micro_wide(int64_t K, const T* __restrict a, int64_t ars, int64_t aks,
                       const W* __restrict b, int64_t pstride, T* __restrict c, int64_t ldc,
                       int64_t ncols, T alpha, T beta, Side&& side = Side()) {
    static_assert(SR % KS == 0, "side steps: whole sets of k");
    typedef typename Vec<T>::type V;
    constexpr int L = VL<T>;
    V acc[KS][mr][2 * NP];
    for (int s = 0; s < KS; ++s)
        for (int r = 0; r < mr; ++r)
            for (int q = 0; q < 2 * NP; ++q) acc[s][r][q] = V{};
    auto step = [&](int s, int64_t k) {
        T av[mr];
        for (int r = 0; r < mr; ++r) av[r] = a[r * ars + k * aks];
        for (int p = 0; p < NP; ++p) {
            V b0, b1;
            load_w2(b + p * pstride + k * 2 * L, b0, b1);
            for (int r = 0; r < mr; ++r) {
                acc[s][r][2 * p] += av[r] * b0;
                acc[s][r][2 * p + 1] += av[r] * b1;
            }
        }
    };
    int64_t k = 0;
    if constexpr (SR > 0) {
        for (; k + SR <= K; k += SR) {
            for (int u = 0; u < SR; u += KS)
                for (int s = 0; s < KS; ++s) step(s, k + u + s);
            side();
        }
    }
    for (; k + KS <= K; k += KS)
        for (int s = 0; s < KS; ++s) step(s, k + s);
    for (; k < K; ++k) step(0, k);
    for (int w = 1; w < KS; w *= 2)            // the sets' sum as a tree
        for (int s = 0; s + w < KS; s += 2 * w)
            for (int r = 0; r < mr; ++r)
                for (int q = 0; q < 2 * NP; ++q) acc[s][r][q] += acc[s + w][r][q];
    if (alpha == T(1) && beta == T(0) && ncols == 2 * NP * L) {      // the common case: plain stores
        for (int r = 0; r < mr; ++r)
            for (int q = 0; q < 2 * NP; ++q) std::memcpy(c + r * ldc + q * L, &acc[0][r][q], sizeof(V));
        return;
    }
    for (int r = 0; r < mr; ++r) {
        T tmp[2 * NP * L];
        for (int q = 0; q < 2 * NP; ++q) std::memcpy(tmp + q * L, &acc[0][r][q], sizeof(V));
        T* cr = c + r * ldc;
        if (beta == T(0)) {
            for (int64_t j = 0; j < ncols; ++j) cr[j] = alpha * tmp[j];
        } else {
            for (int64_t j = 0; j < ncols; ++j) cr[j] = alpha * tmp[j] + beta * cr[j];
        }
    }
}

// A few rows (1 to SMALL_ROWS) of A (read in place) times all panels of Bp: NP panels at a
// time, so several B streams are in flight (a large weight slice streams from L3). With
// reverse the panels are visited last to first: alternating the direction step after step
// ("snake" order) keeps the most recently used part of a weight slice that is a little larger
// than the cache resident for the next step, instead of evicting everything in LRU order.
// Groups of fewer than 8 accumulators take KSM sets of them (at least 8 in all), and the panels
// left over (fewer than NP) go one at a time with as many sets: every column is summed the same
// way wherever its panel falls, so a team of two's halves of a product are the one thread's bit
// for bit (the small layer's team, dir_forward_w). (A leftover panel then has as few as 2 x mr
// chains of FMAs: one panel of a product, at most.)
constexpr int acc_sets(int accs) { return accs >= 8 ? 1 : (8 + accs - 1) / accs; }   // sets for >= 8
template <class T, int mr, int NP, class W = T, int SR = 0, class Side = NoSide>
void small_rows_n(int64_t N, int64_t K, const T* A, int64_t ars, int64_t aks, const W* Bp,
                  T alpha, T beta, T* C, int64_t ldc, bool reverse, int64_t kpanel, Side&& side = Side()) {
    const int nr = NR<T>;
    const int64_t nt = ceil_div(N, nr), ps = (kpanel ? kpanel : K) * nr;
    const int64_t groups = ceil_div(nt, NP);
    constexpr int KSM = acc_sets(2 * mr * NP);
    for (int64_t gi = 0; gi < groups; ++gi) {
        const int64_t g = reverse ? groups - 1 - gi : gi;
        const int64_t j0 = g * NP;
        if (j0 + NP <= nt && (j0 + NP) * nr <= N) {
            micro_wide<T, mr, NP, W, KSM, SR>(K, A, ars, aks, Bp + j0 * ps, ps, C + j0 * nr, ldc, NP * nr, alpha,
                                              beta, side);
            continue;
        }
        for (int64_t j = j0; j < nt && j < j0 + NP; ++j) {
            const int64_t n0 = j * nr, nc = N - n0 < nr ? N - n0 : nr;
            micro_wide<T, mr, 1, W, KSM>(K, A, ars, aks, Bp + j * ps, ps, C + n0, ldc, nc, alpha, beta);
        }
    }
}
// Rows that small_rows takes (the rest go to the MR-row micro-kernel, one panel at a time):
// with 32 vector registers up to 6 (6 rows x 2 panels = 24 accumulators); measured on the
// AVX-512 Xeon against the 12-row kernel, T=25 B=4 I=H=1024 LSTM 14.7 -> 12.6 ms, GRU B=5
// 11.4 -> 9.8, T=100 B=4 H=256 LSTM 1.46-1.59 -> 1.36 (training 4.75 -> 4.38).
constexpr int64_t SMALL_ROWS = VB >= 64 ? 6 : 2;
template <class T, class W = T>   // 1 <= M <= SMALL_ROWS
void small_rows(int64_t M, int64_t N, int64_t K, const T* A, int64_t ars, int64_t aks,
                const W* Bp, T alpha, T beta, T* C, int64_t ldc, bool reverse, int64_t kpanel = 0) {
    // One row: two panels at a time (two sets of their 4 accumulators) rather than four (one
    // set of 8): half the concurrent weight streams, and the alternating sweeps reuse what is
    // left in L1 at a finer grain. Two Xeon cores, T=100 B=1, alternating processes, three
    // rounds (us, four panels / two): RNN H=64 18.4-18.9 / 16.9-17.0, H=128 67.7-70.8 /
    // 58.7-60.3, H=384 289-298 / 257-262, H=512 454-468 / 432-443; GRU H=64 44.5-44.9 /
    // 42.4-42.9, H=128 193-219 / 183, H=384 770-782 / 727-745; LSTM H=256 490-514 / 476-480;
    // RNN H=256 137-138 / 141-147 (its split-phase halves); the others alike. Not with AVX2
    // (a panel's k row is one cache line there; forced on the same Xeon, two panels ran GRU
    // H=512 6-10% slower, LSTM H=256 up to 8%), which keeps four.
    if (M == 1) {
        small_rows_n<T, 1, VB >= 64 ? 2 : 4>(N, K, A, ars, aks, Bp, alpha, beta, C, ldc, reverse, kpanel);
    } else if (M == 2 || SMALL_ROWS < 3) {
        small_rows_n<T, 2, 2>(N, K, A, ars, aks, Bp, alpha, beta, C, ldc, reverse, kpanel);
    } else if constexpr (SMALL_ROWS >= 6) {
        switch (M) {
            case 3: small_rows_n<T, 3, 2>(N, K, A, ars, aks, Bp, alpha, beta, C, ldc, reverse, kpanel); break;
            case 4: small_rows_n<T, 4, 2>(N, K, A, ars, aks, Bp, alpha, beta, C, ldc, reverse, kpanel); break;
            case 5: small_rows_n<T, 5, 2>(N, K, A, ars, aks, Bp, alpha, beta, C, ldc, reverse, kpanel); break;
            default: small_rows_n<T, 6, 2>(N, K, A, ars, aks, Bp, alpha, beta, C, ldc, reverse, kpanel); break;
        }
    }
}

// The batch-1 per-step product (small_rows with one row: the same kernel, the same sums) with a
// piece of the next block's input projection beside it: pc.rows rows of x (I columns, ldx
// apart) against consecutive packed panels of W_ih (I x NR each), into pc.out (ldo apart, a
// panel's NR columns after the last's), in tiles of PIECE_ROWS rows of one panel, the tiles
// [t0, t1) of the piece (panel by panel), one k-step of the projection every SR k-steps of the
// product (the product streams W_hh from the L2 at about half the FMA rate: the projection's
// FMAs fill the other half), W_ih's panel rows prefetched PIECE_PF k-steps ahead (behind the
// product's stream of fills they miss the L1 otherwise). What the product's sweep leaves undone
// is finished after it. Each column of the piece is one chain of FMAs over k in order, as in
// gemm_pb's row tiles: the same sums.
constexpr int PIECE_ROWS = 8, PIECE_PF = 2;
constexpr int64_t SPREAD_PER_STEP = 4;   // the most panels a step (dir_forward_w's `spread`)
template <class T> struct Piece {
    const T* x;
    int64_t ldx, I, rows;   // rows: a multiple of PIECE_ROWS
    const T* w;             // the first packed panel of W_ih
    int64_t panels;
    T* out;
    int64_t ldo;
    int64_t tiles() const { return panels * (rows / PIECE_ROWS); }
};
template <class T, class W>
void product_with_piece(int64_t N, int64_t K, const T* A, const W* Bp, T beta, T* C, int64_t ldc, bool reverse,
                        int64_t kpanel, const Piece<T>& pc, int64_t t0, int64_t t1) {
    typedef typename Vec<T>::type V;
    constexpr int L = VL<T>, NP = VB >= 64 ? 2 : 4;   // small_rows' pairs (quads) of panels at one row
    V pa[PIECE_ROWS][2];
    const int64_t rt = pc.rows / PIECE_ROWS;   // tiles a panel
    int64_t ti = t0, kp = 0;
    const T* wp = nullptr;   // the tile's panel, rows and output
    const T* xp = nullptr;
    T* op = nullptr;
    auto start = [&] {
        for (int r = 0; r < PIECE_ROWS; ++r) pa[r][0] = pa[r][1] = V{};
        const int64_t pp = ti / rt, r0 = ti % rt * PIECE_ROWS;
        wp = pc.w + pp * pc.I * 2 * L;
        xp = pc.x + r0 * pc.ldx;
        op = pc.out + pp * 2 * L + r0 * pc.ldo;
    };
    auto kstep = [&]() __attribute__((always_inline)) {
        const T* wr = wp + kp * 2 * L;
        __builtin_prefetch(wr + PIECE_PF * 2 * L);
        __builtin_prefetch(wr + PIECE_PF * 2 * L + L);
        V w0, w1;
        std::memcpy(&w0, wr, sizeof w0);
        std::memcpy(&w1, wr + L, sizeof w1);
        const T* xr = xp + kp;
        for (int r = 0; r < PIECE_ROWS; ++r) {
            const T xv = xr[r * pc.ldx];
            pa[r][0] += xv * w0;
            pa[r][1] += xv * w1;
        }
        if (++kp == pc.I) {   // the tile's rows done
            for (int r = 0; r < PIECE_ROWS; ++r) {
                std::memcpy(op + r * pc.ldo, &pa[r][0], sizeof(V));
                std::memcpy(op + r * pc.ldo + L, &pa[r][1], sizeof(V));
            }
            kp = 0;
            if (++ti < t1) start();
        }
    };
    auto side = [&]() __attribute__((always_inline)) { if (ti < t1) kstep(); };
    if (ti < t1) start();
    const int64_t steps = N / (NP * NR<T>) * K, need = (t1 - t0) * pc.I;
    if (steps >= 8 * need)
        small_rows_n<T, 1, NP, W, 8>(N, K, A, 1, 1, Bp, T(1), beta, C, ldc, reverse, kpanel, side);
    else if (steps >= 4 * need)
        small_rows_n<T, 1, NP, W, 4>(N, K, A, 1, 1, Bp, T(1), beta, C, ldc, reverse, kpanel, side);
    else
        small_rows_n<T, 1, NP, W, 2>(N, K, A, 1, 1, Bp, T(1), beta, C, ldc, reverse, kpanel, side);
    while (ti < t1) kstep();
}

// micro<T, mr, inplace> for a run-time row count mr (1..MR).
template <class T, bool inplace = false, int R = MR, class W = T, bool PF = false>
inline void micro_dispatch(int mr, int64_t K, const T* a, const W* b, T* c, int64_t ldc,
                           int64_t ncols, T alpha, T beta, int64_t lda = 0,
                           const char* pf = nullptr, int64_t pfq = 0) {
    if (mr == R) micro<T, R, inplace, W, PF>(K, a, b, c, ldc, ncols, alpha, beta, lda, pf, pfq);
    else if constexpr (R > 1) micro_dispatch<T, inplace, R - 1, W, PF>(mr, K, a, b, c, ldc, ncols, alpha, beta, lda, pf, pfq);
}

// Every buffer the kernels allocate ends in PREFETCH_PAD spare bytes, written once: the
// micro-kernel prefetches B 128 steps of k (8 KiB for float) ahead, and a prefetch that runs
// off the end of an allocation into an unmapped or never-touched page costs a page walk
// every time (perf: 73% of the micro-kernel's samples on that prefetch; a GEMM whose packed
// B is a few short panels, M=1024 N=128 K=100, ran at 12-15 GFLOP/s instead of 60).
constexpr size_t PREFETCH_PAD = 16384;
inline void* aligned_buffer(size_t bytes) {
    const size_t body = (bytes + 63) / 64 * 64;
    unsigned char* p = static_cast<unsigned char*>(std::aligned_alloc(64, body + PREFETCH_PAD));
    if (p) std::memset(p + body, 0, PREFETCH_PAD);   // present pages: a prefetch into an
    return p;                                        // untouched page walks the tables each time
}

template <class T> T* alloc(int64_t n) {
    const size_t bytes = (size_t)(n > 0 ? n : 1) * sizeof(T);
    void* p = aligned_buffer(bytes);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
}

// ------------------------------------------------------------------ content hash
// A 64-bit hash of a byte range at close to the speed of reading it, to validate packed
// weights kept across calls (PackedWeights): the construction of XXH3's long-input loop.
// Each 64-bit lane of four accumulators takes acc += d + lo32(d ^ k) * hi32(d ^ k) with a
// key k per position in a 16-stripe block, and every block ends with a multiplicative
// scramble (acc ^= acc >> 47; acc ^= k'; acc *= prime), so the result depends non-linearly
// on every bit and on its position; a changed input gives the same hash with a chance of
// about 2^-64. 35-45 GB/s per core with AVX2 from L1/L2 on a Zen 3 (hash_block).
typedef uint64_t U64V __attribute__((vector_size(VB)));
constexpr int UL = VB / 8;                                   // 64-bit lanes per register

inline U64V mul32(U64V a, U64V b) {                          // lo32(a) * lo32(b) per lane
#if RNNCORE_VEC_BYTES == 64 && defined(__AVX512F__)
    return (U64V)_mm512_mul_epu32((__m512i)a, (__m512i)b);
#elif RNNCORE_VEC_BYTES == 32 && defined(__AVX2__)
    return (U64V)_mm256_mul_epu32((__m256i)a, (__m256i)b);
#elif RNNCORE_VEC_BYTES == 16 && defined(__SSE2__)
    return (U64V)_mm_mul_epu32((__m128i)a, (__m128i)b);
#else
    const U64V lo = U64V{} + (uint64_t)0xFFFFFFFFu;
    return (a & lo) * (b & lo);
#endif
}

constexpr uint64_t mix64(uint64_t z) {                       // splitmix64's finaliser
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

constexpr int HASH_ACC = 4, HASH_STRIPES = 16;
struct HashKeys {
    uint64_t k[(HASH_STRIPES + 1) * HASH_ACC * 8];
    constexpr HashKeys() : k() {
        uint64_t s = 0x243F6A8885A308D3ull;
        for (int i = 0; i < (HASH_STRIPES + 1) * HASH_ACC * 8; ++i) {
            s += 0x9E3779B97F4A7C15ull;
            k[i] = mix64(s);
        }
    }
};
constexpr HashKeys HASH_KEYS{};

inline U64V hash_key(int stripe, int acc) {
    U64V v;
    std::memcpy(&v, HASH_KEYS.k + (stripe * HASH_ACC + acc) * UL, sizeof v);
    return v;
}

inline U64V load_u64v(const unsigned char* p) {
    U64V v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// One block of HASH_STRIPES stripes of HASH_ACC registers, then the scramble. Unrolled by
// four stripes, not sixteen: fully unrolled, GCC hoisted every product ahead of the sums and
// spilled them (about 21 GB/s in L1 on a Zen 3 core; 35-53 GB/s like this).
inline void hash_block(const unsigned char* q, U64V& a0, U64V& a1, U64V& a2, U64V& a3) {
    constexpr int64_t S = HASH_ACC * VB;
#pragma GCC unroll 4
    for (int st = 0; st < HASH_STRIPES; ++st) {
        const U64V d0 = load_u64v(q + st * S), d1 = load_u64v(q + st * S + VB);
        const U64V d2 = load_u64v(q + st * S + 2 * VB), d3 = load_u64v(q + st * S + 3 * VB);
        const U64V k0 = d0 ^ hash_key(st, 0), k1 = d1 ^ hash_key(st, 1);
        const U64V k2 = d2 ^ hash_key(st, 2), k3 = d3 ^ hash_key(st, 3);
        a0 += mul32(k0, k0 >> 32) + d0;
        a1 += mul32(k1, k1 >> 32) + d1;
        a2 += mul32(k2, k2 >> 32) + d2;
        a3 += mul32(k3, k3 >> 32) + d3;
    }
    const U64V prime = U64V{} + (uint64_t)0x9E3779B1u;
    U64V* acc[4] = {&a0, &a1, &a2, &a3};
    for (int i = 0; i < 4; ++i) {
        U64V a = *acc[i];
        a ^= a >> 47;
        a ^= hash_key(HASH_STRIPES, i);
        *acc[i] = mul32(a, prime) + (mul32(a >> 32, prime) << 32);   // a * prime mod 2^64
    }
}

inline uint64_t content_hash(const void* data, int64_t bytes, uint64_t seed) {
    constexpr int64_t BLOCK = HASH_STRIPES * HASH_ACC * VB;
    const unsigned char* p = static_cast<const unsigned char*>(data);
    const U64V s = U64V{} + mix64(seed);
    U64V a0 = hash_key(HASH_STRIPES, 0) ^ s, a1 = hash_key(HASH_STRIPES, 1) + s;
    U64V a2 = hash_key(HASH_STRIPES, 2) ^ (s >> 7), a3 = hash_key(HASH_STRIPES, 3) - s;
    int64_t off = 0;
    for (; off + BLOCK <= bytes; off += BLOCK) hash_block(p + off, a0, a1, a2, a3);
    if (off < bytes) {                                       // the tail, zero padded
        alignas(64) unsigned char tail[BLOCK];
        std::memset(tail, 0, sizeof tail);
        std::memcpy(tail, p + off, (size_t)(bytes - off));
        hash_block(tail, a0, a1, a2, a3);
    }
    uint64_t h = mix64(seed ^ ((uint64_t)bytes * 0x9E3779B97F4A7C15ull));
    const U64V all[4] = {a0, a1, a2, a3};
    for (int i = 0; i < 4; ++i)
        for (int l = 0; l < UL; ++l) h = mix64(h ^ all[i][l]) + (uint64_t)(i * UL + l);
    return h;
}

// C = A @ Bp (+ beta C) in the calling thread; Bp packed from a [K, N] operand, A (the few
// rows of a per-step product, already in L1) read where it lies. Each panel of Bp is read by
// the first row tile from where it lies and by the others from the L2.
//
// stream: Bp comes from the L3 (the thread's weights exceed its L2). The first row tile then
// streams its panel faster than the L3 delivers to one core (12 rows: 128 bytes a step of k
// for 24 FMAs, ~32 GB/s at full speed against ~29) while the L3 idles through the others. So
// the second and third tiles (the second alone, of two) fetch the next panel into the L2, half
// each, and every tile runs from the L2. Measured on the AVX-512 Xeon (2 MiB of L2 a core), two
// threads, against the build before it in alternating processes, together with the projection
// moved after the product (dir_forward_w) (ms, before / after): inference T=50 B=32 I=H=1024
// LSTM 85.3-88.1 / 79.9-81.0, GRU 63.5-65.1 / 61.5-61.7; T=100 B=64 I=256 H=512 LSTM 66.4-67.6
// / 64.9-65.4; training within the noise (phases of LSTM T=50 B=32 I=H=1024: projection 43.3
// / 39.1, forward products 41.2 / 37.2, backward products 40.8 / 37.9). Where the weights stay
// in the L2 the prefetches would only take issue slots, so callers set it only where they do
// not; the prefetching loop is its own instantiation of the micro-kernel, so the others have no
// test in their loop (a run-time test there slowed every product).
template <class T, class W = T>
inline void gemm_pb(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const W* Bp,
                    T beta, T* C, int64_t ldc, bool reverse = false, int64_t kpanel = 0,
                    bool stream = false, bool tiles = false) {
    // kpanel: rows of each packed panel when only K of them are used (a part of the inner
    // dimension: Bp and A then point at its first row and column). tiles: few rows through the
    // row tiles too (the input projection's blocks: one chain of FMAs a column whatever the
    // block's rows, where small_rows sums a single row's k in two sets)
    if (M <= SMALL_ROWS && !tiles) {
        small_rows<T>(M, N, K, A, lda, 1, Bp, T(1), beta, C, ldc, reverse, kpanel);
        return;
    }
    const int64_t KP = kpanel ? kpanel : K;
    const int nr = NR<T>;
    const int64_t mt = ceil_div(M, MR), nt = ceil_div(N, nr);
    for (int64_t j = 0; j < nt; ++j) {
        const int64_t n0 = j * nr, nc = N - n0 < nr ? N - n0 : nr;
        for (int64_t i = 0; i < mt; ++i) {
            const int64_t m0 = i * MR;
            const int mr = (int)(M - m0 < MR ? M - m0 : MR);
            // With stream, the second and third row tiles (or the second alone, of two) bring
            // the next panel's rows into the L2, half each, as they run from the L2 themselves
            const char* pf = nullptr;
            int64_t pfq = 0;
            if (stream && j + 1 < nt && i >= 1 && i <= 2 && !(i == 2 && mt == 2)) {
                const int64_t share = ceil_div(K * nr * (int64_t)sizeof(W), mt > 2 ? 2 : 1);
                pf = reinterpret_cast<const char*>(Bp + (j + 1) * KP * nr) + (i - 1) * share;
                pfq = share * 256 / K;
            }
            if (pf)
                micro_dispatch<T, true, MR, W, true>(mr, K, A + m0 * lda, Bp + j * KP * nr, C + m0 * ldc + n0,
                                                     ldc, nc, T(1), beta, lda, pf, pfq);
            else
                micro_dispatch<T, true, MR, W>(mr, K, A + m0 * lda, Bp + j * KP * nr, C + m0 * ldc + n0, ldc,
                                               nc, T(1), beta, lda);
        }
    }
}

// Whether a thread's slice of the recurrent weights (`bytes`, packed) takes the split-phase
// product below. Its two phases read the slice in two halves, the own rows of every panel,
// then the rest: between two reads of a row a whole slice passes, so a slice larger than the
// L2 is read from the L3 at every step, where one sweep per step in alternating directions
// (after a full barrier) finds the part of it read last still in the L2. Measured on a Xeon
// with 2 MiB of L2 per core, T=100 B=1, two threads, split against one sweep (ms): LSTM
// H=256 (slice 0.5 MiB) 0.48 / 0.50, H=384 (1.1 MiB) 0.95-0.99 / 0.97-1.03, H=512 (2 MiB)
// 2.8 / 2.3-2.5, H=768 (4.5 MiB) 17.0 / 12.9; GRU H=512 (1.5 MiB) 1.38-1.43 / 1.37-1.42,
// H=640 (2.3 MiB) 5.0-5.2 / 4.1. So the split up to three quarters of the L2.
inline bool split_fits(int64_t bytes) { return bytes * 4 <= l2_cache_bytes() * 3; }

// The per-step product of a recurrence team in two phases (the split-phase step barrier):
// C = A @ Bp over an inner dimension of `groups` groups of gl rows, first over the rows
// [g gl + lo, g gl + lo + n) of every group (the part of A this thread wrote itself), then,
// after wait() (the others' parts are complete), over the groups' remaining rows. Columns of
// A from k2 on are read from A2 (same layout: the reset-after GRU's dgh, whose other columns
// equal dgx's and are not stored). Each part of the product goes through prod(kk, a, bp, beta):
// C (+)= kk columns of A from a times kk rows of the packed panels from bp (gemm_pb by default).
template <class T, class W, class Wait, class Prod>
void split_product(int64_t M, int64_t N, int groups, int64_t gl, int64_t lo, int64_t n, const T* A,
                   const T* A2, int64_t k2, int64_t lda, const W* Bp, T* C, int64_t ldc, bool reverse,
                   Wait&& wait, Prod&& prod) {
    const int64_t nr = NR<T>, K = groups * gl;
    auto seg = [&](int64_t k0, int64_t k1, T beta) {   // the rows [k0, k1), split at k2
        if (k0 < k2 && k1 > k2) {
            prod(k2 - k0, A + k0, Bp + k0 * nr, beta);
            k0 = k2;
            beta = T(1);
        }
        prod(k1 - k0, (k0 < k2 ? A : A2) + k0, Bp + k0 * nr, beta);
    };
    for (int g = 0; g < groups; ++g) seg(g * gl + lo, g * gl + lo + n, T(g > 0));
    wait();
    for (int g = 0; g <= groups; ++g) {   // the gaps before, between and after the own rows
        const int64_t k0 = g == 0 ? 0 : (g - 1) * gl + lo + n;
        const int64_t k1 = g == groups ? K : g * gl + lo;
        if (k1 > k0) seg(k0, k1, T(1));
    }
}
template <class T, class W, class Wait>
void split_product(int64_t M, int64_t N, int groups, int64_t gl, int64_t lo, int64_t n, const T* A,
                   const T* A2, int64_t k2, int64_t lda, const W* Bp, T* C, int64_t ldc, bool reverse,
                   Wait&& wait) {
    split_product<T>(M, N, groups, gl, lo, n, A, A2, k2, lda, Bp, C, ldc, reverse, wait,
                     [&](int64_t kk, const T* a, const W* bp, T beta) {
                         gemm_pb<T>(M, N, kk, a, lda, bp, beta, C, ldc, reverse, groups * gl);
                     });
}

// ------------------------------------------------------------------ activations
// float: vectorised approximations (exp: Cephes' range reduction and degree-5 polynomial,
// ~1 ulp; tanh: Eigen's 13/6 rational approximation, a few ulp; sigmoid = 1/(1+exp(-x))).
// The maximum errors are measured by the test suite (tests/test_speed_paths.py).
// double: the C library, lane by lane (double is the gradient-checking dtype).
template <class T> using VT = typename Vec<T>::type;
typedef int32_t VIf __attribute__((vector_size(VB)));

template <class T> inline VT<T> splat(T s) { return VT<T>{} + s; }

// Horizontal sums of L = VL<T> vectors at once: out lane r = sum of the lanes of v[r]. A tree
// of log2(L) levels, each halving the vectors with two shuffles and an add (L - 1 adds in all
// instead of L scalar reductions of L - 1 dependent adds each). Feeding the vectors in bit-
// reversed order makes the tree's output land in natural order.
template <int... Q> struct ISeq {};
template <int N, int... Q> struct MkSeq : MkSeq<N - 1, N - 1, Q...> {};
template <int... Q> struct MkSeq<0, Q...> { typedef ISeq<Q...> type; };
template <class T> struct IVec;
template <> struct IVec<float> { typedef int32_t type __attribute__((vector_size(VB))); };
template <> struct IVec<double> { typedef int64_t type __attribute__((vector_size(VB))); };
constexpr int tree_lo(int L, int w, int q) { return q % (2 * w) < w ? q : L + q - w; }
constexpr int tree_hi(int L, int w, int q) { return q % (2 * w) < w ? q + w : L + q; }
constexpr int bit_reverse(int j, int L) {
    int r = 0;
    for (int b = 1; b < L; b <<= 1, j >>= 1) r = (r << 1) | (j & 1);
    return r;
}
template <class IV, int L, int W, int... Q> inline IV tree_mask(bool hi, ISeq<Q...>) {
    return hi ? IV{tree_hi(L, W, Q)...} : IV{tree_lo(L, W, Q)...};
}
// Clang has no __builtin_shuffle (a mask vector); its __builtin_shufflevector takes the
// constant indices as arguments.
#if defined(__clang__)
template <int L, int W, bool HI, class V, int... Q> inline V tree_pick(V a, V b, ISeq<Q...>) {
    return __builtin_shufflevector(a, b, (HI ? tree_hi(L, W, Q) : tree_lo(L, W, Q))...);
}
#endif
template <class T, int W> inline void tree_level(VT<T>* cur, int n) {
    constexpr int L = VL<T>;
#if defined(__clang__)
    typedef typename MkSeq<L>::type Seq;
    for (int j = 0; j < n / 2; ++j)
        cur[j] = tree_pick<L, W, false>(cur[2 * j], cur[2 * j + 1], Seq{}) +
                 tree_pick<L, W, true>(cur[2 * j], cur[2 * j + 1], Seq{});
#else
    typedef typename IVec<T>::type IV;
    const IV lo = tree_mask<IV, L, W>(false, typename MkSeq<L>::type{});
    const IV hi = tree_mask<IV, L, W>(true, typename MkSeq<L>::type{});
    for (int j = 0; j < n / 2; ++j)
        cur[j] = __builtin_shuffle(cur[2 * j], cur[2 * j + 1], lo) + __builtin_shuffle(cur[2 * j], cur[2 * j + 1], hi);
#endif
    if constexpr (W > 1) tree_level<T, W / 2>(cur, n / 2);
}
template <class T> inline VT<T> hsum_rows(const VT<T>* v) {
    constexpr int L = VL<T>;
    VT<T> cur[L];
    for (int j = 0; j < L; ++j) cur[j] = v[bit_reverse(j, L)];
    if constexpr (L > 1) tree_level<T, L / 2>(cur, L);
    return cur[0];
}

// N-way versions for float: every statement runs over N independent registers, so the long
// dependency chains of N unit-vectors interleave in the instruction stream. One chain (exp, a
// rational, a division) is longer than the out-of-order window covers, so the gate passes are
// latency-bound when written one register at a time.
#define RNNCORE_EACH(i, N) _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i)
template <int N> struct Regs { static constexpr int n = N; };   // a register count as a type
template <int N> inline void vexp_n(VT<float>* x) {
    typedef VT<float> V;
    const V hi = splat(88.3762626647949f), lo = splat(-88.3762626647949f), magic = splat(12582912.0f);
    V t[N], y[N], z[N];
    RNNCORE_EACH(i, N) { x[i] = x[i] > hi ? hi : x[i]; }
    RNNCORE_EACH(i, N) { x[i] = x[i] < lo ? lo : x[i]; }
    RNNCORE_EACH(i, N) { t[i] = x[i] * 1.44269504088896341f + magic; }
    RNNCORE_EACH(i, N) { const V fl = t[i] - magic; x[i] = x[i] - fl * 0.693359375f + fl * 2.12194440e-4f; }
    RNNCORE_EACH(i, N) { z[i] = x[i] * x[i]; y[i] = x[i] * 1.9875691500E-4f + 1.3981999507E-3f; }
    RNNCORE_EACH(i, N) { y[i] = y[i] * x[i] + 8.3334519073E-3f; }
    RNNCORE_EACH(i, N) { y[i] = y[i] * x[i] + 4.1665795894E-2f; }
    RNNCORE_EACH(i, N) { y[i] = y[i] * x[i] + 1.6666665459E-1f; }
    RNNCORE_EACH(i, N) { y[i] = y[i] * x[i] + 5.0000001201E-1f; }
    RNNCORE_EACH(i, N) { y[i] = y[i] * z[i] + x[i] + 1.0f; }
    VIf mi;
    std::memcpy(&mi, &magic, sizeof mi);
    RNNCORE_EACH(i, N) {
        VIf ti;
        std::memcpy(&ti, &t[i], sizeof ti);
        const VIf e = (ti - mi + 127) << 23;
        V p;
        std::memcpy(&p, &e, sizeof p);
        x[i] = y[i] * p;
    }
}

template <int N> inline void vtanh_pq_n(const VT<float>* x, VT<float>* p, VT<float>* q) {
    typedef VT<float> V;
    const V c = splat(7.90531110763549805f), mc = splat(-7.90531110763549805f);
    V xc[N], x2[N];
    RNNCORE_EACH(i, N) { xc[i] = x[i] > c ? c : x[i]; xc[i] = xc[i] < mc ? mc : xc[i]; x2[i] = xc[i] * xc[i]; }
    RNNCORE_EACH(i, N) { p[i] = x2[i] * -2.76076847742355e-16f + 2.00018790482477e-13f; q[i] = x2[i] * 1.19825839466702e-06f + 1.18534705686654e-04f; }
    RNNCORE_EACH(i, N) { p[i] = p[i] * x2[i] + -8.60467152213735e-11f; q[i] = q[i] * x2[i] + 2.26843463243900e-03f; }
    RNNCORE_EACH(i, N) { p[i] = p[i] * x2[i] + 5.12229709037114e-08f; q[i] = q[i] * x2[i] + 4.89352518554385e-03f; }
    RNNCORE_EACH(i, N) { p[i] = p[i] * x2[i] + 1.48572235717979e-05f; }
    RNNCORE_EACH(i, N) { p[i] = p[i] * x2[i] + 6.37261928875436e-04f; }
    RNNCORE_EACH(i, N) { p[i] = (p[i] * x2[i] + 4.89352455891786e-03f) * xc[i]; }
    RNNCORE_EACH(i, N) {
        const V ax = x[i] < 0.0f ? -x[i] : x[i];
        const auto tiny = ax < 0.0004f;
        p[i] = tiny ? x[i] : p[i];
        q[i] = tiny ? splat(1.0f) : q[i];
    }
}

template <int N> inline void vsigmoid_n(VT<float>* x) {
    RNNCORE_EACH(i, N) x[i] = -x[i];
    vexp_n<N>(x);
    RNNCORE_EACH(i, N) x[i] = 1.0f / (1.0f + x[i]);
}
template <int N> inline void vtanh_n(VT<float>* x) {
    VT<float> p[N], q[N];
    vtanh_pq_n<N>(x, p, q);
    RNNCORE_EACH(i, N) x[i] = p[i] / q[i];
}

// N registers of LSTM units (float). With e_g = exp(-a_g) (arguments clamped to +-40, where the
// sigmoid is within 5e-18 of 0 or 1, so no product below can overflow) and tanh(g) = p_g / q_g:
//   c = c0 / (1 + e_f) + p_g / ((1 + e_i) q_g),   h = p_c / ((1 + e_o) q_c)
// (two divisions instead of five); coupled gates: i = 1 - f. po: the o peepholes times c, or null.
template <int N>
inline void lstm_cell_n(const VT<float>* ai, const VT<float>* af, const VT<float>* ag, VT<float>* ao,
                        const VT<float>* c0, const VT<float>* po, bool coupled, VT<float>* cn,
                        VT<float>* h) {
    typedef VT<float> V;
    const V lim = splat(40.0f), nlim = splat(-40.0f);
    V e[3 * N], pg[N], qg[N];
    RNNCORE_EACH(i, N) {
        V a = ai[i] > lim ? lim : ai[i];
        e[i] = -(a < nlim ? nlim : a);
        V f = af[i] > lim ? lim : af[i];
        e[N + i] = -(f < nlim ? nlim : f);
    }
    vexp_n<2 * N>(e);
    vtanh_pq_n<N>(ag, pg, qg);
    if (coupled) {
        RNNCORE_EACH(i, N) {
            const V f = 1.0f / (1.0f + e[N + i]);
            cn[i] = f * c0[i] + (1.0f - f) * (pg[i] / qg[i]);
        }
    } else {
        RNNCORE_EACH(i, N) {
            const V di = 1.0f + e[i], df = 1.0f + e[N + i];
            const V dq = di * qg[i];
            cn[i] = (c0[i] * dq + pg[i] * df) / (df * dq);
        }
    }
    if (po) { RNNCORE_EACH(i, N) ao[i] += po[i] * cn[i]; }
    RNNCORE_EACH(i, N) {
        const V a = ao[i] > lim ? lim : ao[i];
        e[2 * N + i] = -(a < nlim ? nlim : a);
    }
    vexp_n<N>(e + 2 * N);
    V pc[N], qc[N];
    vtanh_pq_n<N>(cn, pc, qc);
    RNNCORE_EACH(i, N) h[i] = pc[i] / ((1.0f + e[2 * N + i]) * qc[i]);
}

// One register at a time: the same approximations.
inline VT<float> vexp(VT<float> x) { vexp_n<1>(&x); return x; }
inline VT<float> vsigmoid(VT<float> x) { vsigmoid_n<1>(&x); return x; }
inline VT<float> vtanh(VT<float> x) { vtanh_n<1>(&x); return x; }

// double (the gradient-checking dtype): the C library, lane by lane.
inline VT<double> vsigmoid(VT<double> x) {
    for (int i = 0; i < VL<double>; ++i) x[i] = 1.0 / (1.0 + std::exp(-x[i]));
    return x;
}
inline VT<double> vtanh(VT<double> x) {
    for (int i = 0; i < VL<double>; ++i) x[i] = std::tanh(x[i]);
    return x;
}
template <int N> inline void vsigmoid_n(VT<double>* x) { for (int i = 0; i < N; ++i) x[i] = vsigmoid(x[i]); }
template <int N> inline void vtanh_n(VT<double>* x) { for (int i = 0; i < N; ++i) x[i] = vtanh(x[i]); }
template <int N>
inline void lstm_cell_n(const VT<double>* ai, const VT<double>* af, const VT<double>* ag, VT<double>* ao,
                        const VT<double>* c0, const VT<double>* po, bool coupled, VT<double>* cn,
                        VT<double>* h) {
    for (int i = 0; i < N; ++i) {
        const VT<double> f = vsigmoid(af[i]);
        const VT<double> in = coupled ? 1.0 - f : vsigmoid(ai[i]);
        cn[i] = f * c0[i] + in * vtanh(ag[i]);
        if (po) ao[i] += po[i] * cn[i];
        h[i] = vsigmoid(ao[i]) * vtanh(cn[i]);
    }
}

// Loads/stores of up to one register; a short tail is zero filled / partially stored.
template <class T> inline VT<T> ld(const T* p, int64_t n) {
    VT<T> v{};
    if (n >= VL<T>) std::memcpy(&v, p, sizeof v);
    else std::memcpy(&v, p, sizeof(T) * n);
    return v;
}
template <class T> inline void st(T* p, VT<T> v, int64_t n) {
    if (n >= VL<T>) std::memcpy(p, &v, sizeof v);
    else std::memcpy(p, &v, sizeof(T) * n);
}

// s[k] += v over the lanes of one register (a bias gradient summed as its rows are computed).
template <class T> inline void acc_st(T* s, VT<T> v, int64_t n) { st(s, ld(s, n) + v, n); }

// y[k] += x[k], k < n (a bias added to a row of gates).
template <class T> inline void add_row(int64_t n, const T* __restrict x, T* __restrict y) {
    int64_t k = 0;
    for (; k + VL<T> <= n; k += VL<T>) st(y + k, ld(y + k, VL<T>) + ld(x + k, VL<T>), VL<T>);
    for (; k < n; ++k) y[k] += x[k];
}

inline bool active(const int64_t* lengths, int64_t b, int64_t t) {
    return lengths == nullptr || t < lengths[b];
}

// ------------------------------------------------------------------ fused gate passes
// Each processes n consecutive hidden units of one batch row. Gate pointers point at the
// first unit; x-side pre-activations are overwritten with the activations.
template <class T>
void lstm_fwd_row(int64_t n, T* gi, T* gf, T* gg, T* go, const T* hi, const T* hf, const T* hg,
                  const T* ho, const T* cp, T* cn, T* m, const T* pi, const T* pf, const T* po,
                  bool coupled) {
    typedef VT<T> V;
    constexpr int L = VL<T>;
    // N registers of units from k0 (N = 1: the last may be partial), their chains interleaved.
    auto block = [&](int64_t k0, auto regs) __attribute__((always_inline)) {
        constexpr int N = decltype(regs)::n;
        V a[2 * N], g[N], o[N], c0[N], c[N], t[N];   // a: f (N), then i (N)
        int64_t r[N];
        for (int s = 0; s < N; ++s) {
            const int64_t k = k0 + s * L;
            r[s] = N > 1 ? L : n - k;   // whole registers except in the one-register tail
            a[s] = ld(gf + k, r[s]) + ld(hf + k, r[s]);
            a[N + s] = ld(gi + k, r[s]) + ld(hi + k, r[s]);
            g[s] = ld(gg + k, r[s]) + ld(hg + k, r[s]);
            o[s] = ld(go + k, r[s]) + ld(ho + k, r[s]);
            c0[s] = ld(cp + k, r[s]);
            if (pi) {
                a[N + s] += ld(pi + k, r[s]) * c0[s];
                a[s] += ld(pf + k, r[s]) * c0[s];
            }
        }
        if (coupled) {
            vsigmoid_n<N>(a);
            for (int s = 0; s < N; ++s) a[N + s] = splat<T>(1) - a[s];
        } else {
            vsigmoid_n<2 * N>(a);
        }
        vtanh_n<N>(g);
        for (int s = 0; s < N; ++s) {
            c[s] = a[s] * c0[s] + a[N + s] * g[s];
            if (po) o[s] += ld(po + k0 + s * L, r[s]) * c[s];
            t[s] = c[s];
        }
        vsigmoid_n<N>(o);
        vtanh_n<N>(t);
        for (int s = 0; s < N; ++s) {
            const int64_t k = k0 + s * L;
            st(gi + k, a[N + s], r[s]); st(gf + k, a[s], r[s]); st(gg + k, g[s], r[s]);
            st(go + k, o[s], r[s]);
            st(cn + k, c[s], r[s]);
            st(m + k, o[s] * t[s], r[s]);
        }
    };
    int64_t k = 0;
    for (; k + 2 * L <= n; k += 2 * L) block(k, Regs<2>{});
    for (; k < n; k += L) block(k, Regs<1>{});
}

template <class T>
void gru_fwd_row(int64_t n, T* gr, T* gz, T* gn, const T* hr, const T* hz, const T* hn,
                 const T* bhn, const T* hp, T* ex, T* hnext) {
    typedef VT<T> V;
    constexpr int L = VL<T>;
    // N registers of units from k0 (N = 1: the last may be partial), their chains interleaved.
    auto block = [&](int64_t k0, auto regs) __attribute__((always_inline)) {
        constexpr int N = decltype(regs)::n;
        V a[2 * N], hv[N], nn[N];   // a: r (N), then z (N)
        int64_t r[N];
        for (int s = 0; s < N; ++s) {
            const int64_t k = k0 + s * L;
            r[s] = N > 1 ? L : n - k;   // whole registers except in the one-register tail
            a[s] = ld(gr + k, r[s]) + ld(hr + k, r[s]);
            a[N + s] = ld(gz + k, r[s]) + ld(hz + k, r[s]);
            hv[s] = ld(hn + k, r[s]);
            if (bhn) hv[s] += ld(bhn + k, r[s]);
        }
        vsigmoid_n<2 * N>(a);
        for (int s = 0; s < N; ++s) nn[s] = ld(gn + k0 + s * L, r[s]) + a[s] * hv[s];
        vtanh_n<N>(nn);
        for (int s = 0; s < N; ++s) {
            const int64_t k = k0 + s * L;
            st(gr + k, a[s], r[s]); st(gz + k, a[N + s], r[s]); st(gn + k, nn[s], r[s]);
            st(ex + k, hv[s], r[s]);
            st(hnext + k, (splat<T>(1) - a[N + s]) * nn[s] + a[N + s] * ld(hp + k, r[s]), r[s]);
        }
    };
    int64_t k = 0;
    for (; k + 2 * L <= n; k += 2 * L) block(k, Regs<2>{});
    for (; k < n; k += L) block(k, Regs<1>{});
}

// Cho et al.'s GRU, first half: r, z and r * h.
template <class T>
void gru_orig_rz_row(int64_t n, T* gr, T* gz, const T* hr, const T* hz, const T* hp, T* rh) {
    typedef VT<T> V;
    for (int64_t k = 0; k < n; k += VL<T>) {
        const int64_t rem = n - k;
        const V r = vsigmoid(ld(gr + k, rem) + ld(hr + k, rem));
        st(gr + k, r, rem);
        st(gz + k, vsigmoid(ld(gz + k, rem) + ld(hz + k, rem)), rem);
        st(rh + k, r * ld(hp + k, rem), rem);
    }
}

// ... second half: n = tanh(x_n + W_hn (r*h) + b_hn) (b_hn folded into x_n), new h.
template <class T>
void gru_orig_n_row(int64_t n, const T* gz, T* gn, const T* hnv, const T* hp, T* hnext) {
    typedef VT<T> V;
    for (int64_t k = 0; k < n; k += VL<T>) {
        const int64_t rem = n - k;
        const V z = ld(gz + k, rem);
        const V nn = vtanh(ld(gn + k, rem) + ld(hnv + k, rem));
        st(gn + k, nn, rem);
        st(hnext + k, (splat<T>(1) - z) * nn + z * ld(hp + k, rem), rem);
    }
}

template <class T>
void rnn_fwd_row(int64_t n, const T* g, const T* hh, T* hnext, bool relu) {
    typedef VT<T> V;
    constexpr int L = VL<T>;
    int64_t k0 = 0;
    if (!relu) {   // four registers at a time, their tanh chains interleaved
        for (; k0 + 4 * L <= n; k0 += 4 * L) {
            V a[4];
            for (int s = 0; s < 4; ++s) a[s] = ld(g + k0 + s * L, L) + ld(hh + k0 + s * L, L);
            vtanh_n<4>(a);
            for (int s = 0; s < 4; ++s) st(hnext + k0 + s * L, a[s], L);
        }
    }
    for (int64_t k = k0; k < n; k += VL<T>) {
        const int64_t rem = n - k;
        const V a = ld(g + k, rem) + ld(hh + k, rem);
        st(hnext + k, relu ? (a > T(0) ? a : V{}) : vtanh(a), rem);
    }
}

template <class T>
void lstm_bwd_row(int64_t n, const T* gi, const T* gf, const T* gg, const T* go, const T* dm,
                  const T* cp, const T* cn, T* dc, const T* pi, const T* pf, const T* po,
                  bool coupled, T* dai, T* daf, T* dag, T* dao, T* bs = nullptr) {
    typedef VT<T> V;
    const V one = splat<T>(1);
    for (int64_t k = 0; k < n; k += VL<T>) {
        const int64_t r = n - k;
        const V i = ld(gi + k, r), f = ld(gf + k, r), g = ld(gg + k, r), o = ld(go + k, r);
        const V d = ld(dm + k, r), c0 = ld(cp + k, r);
        const V th = vtanh(ld(cn + k, r));
        const V ao = d * th * o * (one - o);
        V dcv = ld(dc + k, r) + d * o * (one - th * th);
        if (po) dcv += ao * ld(po + k, r);
        const V ag = dcv * i * (one - g * g);
        V ai, af;
        if (coupled) {
            ai = V{};
            af = dcv * (c0 - g) * f * (one - f);
        } else {
            ai = dcv * g * i * (one - i);
            af = dcv * c0 * f * (one - f);
        }
        V dcp = dcv * f;
        if (pi) dcp += ai * ld(pi + k, r) + af * ld(pf + k, r);
        st(dc + k, dcp, r);
        st(dai + k, ai, r); st(daf + k, af, r); st(dag + k, ag, r); st(dao + k, ao, r);
        if (bs) {   // the bias gradients [4, n]
            acc_st(bs + k, ai, r); acc_st(bs + n + k, af, r);
            acc_st(bs + 2 * n + k, ag, r); acc_st(bs + 3 * n + k, ao, r);
        }
    }
}

// GRU (both forms): the z and n gates and the direct path dh * z; for the reset-after form
// also the r gate and the hidden-side n gradient (dgh_n = da_n * r). The hidden-side r and z
// gradients equal the input side's, so only dgh's n columns are written: its readers take r
// and z from dgx (dir_backward: ghx).
template <class T>
void gru_bwd_row(int64_t n, const T* gr, const T* gz, const T* gn, const T* ex, const T* hp,
                 const T* dh, bool lbr, T* dxr, T* dxz, T* dxn, T* dhn, T* dhd, T* bs = nullptr,
                 T* bsn = nullptr) {
    typedef VT<T> V;
    const V one = splat<T>(1);
    for (int64_t k = 0; k < n; k += VL<T>) {
        const int64_t rem = n - k;
        const V z = ld(gz + k, rem), nn = ld(gn + k, rem), d = ld(dh + k, rem);
        const V dan = d * (one - z) * (one - nn * nn);
        const V daz = d * (ld(hp + k, rem) - nn) * z * (one - z);
        st(dxz + k, daz, rem);
        st(dxn + k, dan, rem);
        st(dhd + k, d * z, rem);
        if (bs) { acc_st(bs + n + k, daz, rem); acc_st(bs + 2 * n + k, dan, rem); }   // [3, n]
        if (lbr) {
            const V r = ld(gr + k, rem);
            const V dar = dan * ld(ex + k, rem) * r * (one - r);
            st(dxr + k, dar, rem);
            st(dhn + k, dan * r, rem);
            if (bs) acc_st(bs + k, dar, rem);
            if (bsn) acc_st(bsn + k, dan * r, rem);   // the hidden-side n bias
        }
    }
}

// Cho et al.'s GRU: the r gate from d(r*h), and its share of dh.
template <class T>
void gru_orig_r_row(int64_t n, const T* gr, const T* hp, const T* drh, T* dxr, T* dhd) {
    typedef VT<T> V;
    const V one = splat<T>(1);
    for (int64_t k = 0; k < n; k += VL<T>) {
        const int64_t rem = n - k;
        const V r = ld(gr + k, rem), g = ld(drh + k, rem);
        st(dxr + k, g * ld(hp + k, rem) * r * (one - r), rem);
        st(dhd + k, ld(dhd + k, rem) + g * r, rem);
    }
}

template <class T>
void rnn_bwd_row(int64_t n, const T* h, const T* dh, T* da, bool relu, T* bs = nullptr) {
    typedef VT<T> V;
    for (int64_t k = 0; k < n; k += VL<T>) {
        const int64_t rem = n - k;
        const V hv = ld(h + k, rem), d = ld(dh + k, rem);
        const V a = relu ? (hv > T(0) ? d : V{}) : d * (splat<T>(1) - hv * hv);
        st(da + k, a, rem);
        if (bs) acc_st(bs + k, a, rem);
    }
}

// ------------------------------------------------------------------ small batches, unpacked
// For up to four batch rows the recurrent products read the row-major weights in place:
// no packing per call (which at batch 1 would cost as much as the steps themselves for a
// short sequence) and nothing derived from the weights to keep in sync with them.
// SMALL_B (4) rows, and only for short sequences, up to SMALL_T (16) steps (kernels.hpp): from
// L3 the packed panels stream faster, so over a long sequence packing once per call pays for
// itself.
// With packed weights kept across calls (PackSet) a call pays only the hash of W_hh, one
// read: the packed path wins from about 8 steps (T=1..8, B=1 and 4, H=64..1024, measured).
constexpr int64_t SMALL_T_KEPT = 7;
// Rows of W_hh per chunk of the in-place product over a slice larger than the L2 (see
// dir_forward): 32, 64 and 128 alike (GRU T=25 B=1 I=H=1024).
constexpr int64_t INPLACE_ROWS = 64;
// Inference at batch 1 reads a kept packed W_hh slice, not W_hh in place, from this many steps
// on (see dir_forward).
constexpr int64_t PACKED_HH_MIN_T = 40;
// f(g, r0, n, i) for the rows [r0, r0 + n) of each of `groups` groups of `rows` rows, in chunks
// of `chunk`, the i-th chunk visited; last to first where `reverse` (the in-place products'
// alternating sweeps: the chunks read last are still in the L2 when the next step starts).
template <class F>
inline void snake_chunks(int groups, int64_t rows, int64_t chunk, bool reverse, F&& f) {
    const int64_t nck = ceil_div(rows, chunk), total = groups * nck;
    for (int64_t i = 0; i < total; ++i) {
        const int64_t c = reverse ? total - 1 - i : i;
        const int64_t r0 = (c % nck) * chunk;
        f((int)(c / nck), r0, rows - r0 < chunk ? rows - r0 : chunk, i);
    }
}
// The packed path projects the input inside the recurrence, FUSE_ROWS rows (steps * batch)
// at a time (see dir_forward).
constexpr int64_t FUSE_ROWS = 64;
constexpr int64_t FEW_FUSE_ROWS = 16, FEW_FUSE_B = 4, PIPE_FUSE_ROWS = 8;   // see dir_forward
// W_ih is read in place by the projection (not packed and hashed with W_hh) when I exceeds
// this many times the rows of the call (T * B): see dir_forward.
constexpr int64_t IH_INPLACE_ROWS = 5;

// Y[b, n] = sum_k W[n, k] X[b, k] for n < N, b < NB (W row-major, rows of length K).
// RB rows of W against NB rows of X: RB*NB accumulators; each W vector is loaded once.
template <class T, int NB>
void gemv_nt(int64_t N, int64_t K, const T* W, int64_t ldw, const T* X, int64_t ldx, T* Y,
             int64_t ldy, T beta = T(0)) {
    typedef VT<T> V;
    constexpr int L = VL<T>;
    // Three rows of W at a time against the NB rows of X (each X load serves three products,
    // 3 * NB accumulators; their sums across lanes as a tree). Two threads of a Zen 3, 15
    // alternating rounds, each variant warmed, NB = 4: N=2048 K=1024 (8 MB from L3) 66 -> 85
    // GFLOP/s, N=512 K=256 61 -> 79, N=512 K=128 45 -> 64 against one row at a time with two
    // steps of k in flight; NB = 2, N=512 K=256 41 -> 54. NB = 1 (the streaming step's long
    // rows, read from memory) against one row with eight steps of k in flight, alternating
    // processes, three rounds: a step of LSTM I=H=1024 2.27-2.52 ms against 2.58-2.86, GRU
    // I=H=512 138-174 us against 155-183 (the step reads those rows with gemv_stream since
    // session 33: one row with two steps of k in flight, 1.6 times as fast on a Zen 4).
    // AVX-512's 32 registers take more rows a block where several X rows share each W load:
    // six rows for two X rows (12 accumulators), four for three or four (16). Two Xeon cores,
    // one `step` from Python (us), three rows a block against these: LSTM I=64 H=128 B=2
    // 10.9-11.6 / 9.4-10.2, B=4 15.2-16.3 / 12.8-13.0; LSTM I=128 H=256 B=3 33.2-35.7 / 28.2-29.7,
    // B=4 38-42 / 30-33; GRU I=256 H=512 B=4 104-109 / 79-83 (six rows for three or four X
    // rows ran slower at small layers: LSTM I=64 H=128 B=4 15.2 / 17.6-18.3).
    constexpr int RB = VB >= 64 && NB == 2 ? 6 : VB >= 64 && NB >= 3 ? 4 : 3;
    const int64_t KB = K / L * L;
    auto hsum = [](V v) { T s = 0; for (int i = 0; i < L; ++i) s += v[i]; return s; };
    auto store = [&](int64_t n, int b, T sum) {
        T* yp = Y + b * ldy + n;
        *yp = beta == T(0) ? sum : sum + beta * *yp;
    };
    int64_t n = 0;
    for (; n + RB <= N; n += RB) {
        V acc[RB][NB];
        for (int r = 0; r < RB; ++r)
            for (int b = 0; b < NB; ++b) acc[r][b] = V{};
        for (int64_t k = 0; k < KB; k += L) {
            V xv[NB];
            for (int b = 0; b < NB; ++b) xv[b] = ld(X + b * ldx + k, L);
            for (int r = 0; r < RB; ++r) {
                const V w = ld(W + (n + r) * ldw + k, L);
                for (int b = 0; b < NB; ++b) acc[r][b] += w * xv[b];
            }
        }
        // the RB * NB sums across lanes, L at a time as a tree (hsum_rows)
        constexpr int NS = RB * NB, NG = (NS + L - 1) / L;
        V grp[NG * L];
        for (int i = 0; i < NG * L; ++i) grp[i] = i < NS ? acc[i / NB][i % NB] : V{};
        T sums[NG * L];
        for (int g = 0; g < NG; ++g) {
            const V sv = hsum_rows<T>(grp + g * L);
            for (int i = 0; i < L; ++i) sums[g * L + i] = sv[i];
        }
        for (int r = 0; r < RB; ++r) {
            const T* w = W + (n + r) * ldw;
            for (int b = 0; b < NB; ++b) {
                T sum = sums[r * NB + b];
                const T* x = X + b * ldx;
                for (int64_t k = KB; k < K; ++k) sum += w[k] * x[k];
                store(n + r, b, sum);
            }
        }
    }
    for (; n < N; ++n) {
        const T* w0 = W + n * ldw;
        for (int b = 0; b < NB; ++b) {
            const T* x = X + b * ldx;
            V a{};
            for (int64_t k = 0; k < KB; k += L) a += ld(w0 + k, L) * ld(x + k, L);
            T sum = hsum(a);
            for (int64_t k = KB; k < K; ++k) sum += w0[k] * x[k];
            store(n, b, sum);
        }
    }
}

// Y[b, n] = sum_k X[b, k] W[k, n] for n < N (columns of a row-major W with row stride ldw).
// Blocks of CV vectors of columns against NB rows of X: CV*NB = 8 accumulators.
template <class T, int NB>
void gemv_nn(int64_t K, int64_t N, const T* W, int64_t ldw, const T* X, int64_t ldx, T* Y,
             int64_t ldy, T beta = T(0)) {
    typedef VT<T> V;
    constexpr int L = VL<T>;
    constexpr int CV = NB == 1 ? 8 : NB == 2 ? 4 : 2;
    for (int64_t n0 = 0; n0 < N; n0 += CV * L) {
        int64_t rem[CV];
        for (int c = 0; c < CV; ++c) rem[c] = N - n0 - c * L;
        V acc[NB][CV];
        for (int b = 0; b < NB; ++b)
            for (int c = 0; c < CV; ++c) acc[b][c] = V{};
        if (rem[CV - 1] >= L) {
            for (int64_t k = 0; k < K; ++k) {
                const T* w = W + k * ldw + n0;
                V wv[CV];
                for (int c = 0; c < CV; ++c) wv[c] = ld(w + c * L, L);
                for (int b = 0; b < NB; ++b) {
                    const T xv = X[b * ldx + k];
                    for (int c = 0; c < CV; ++c) acc[b][c] += xv * wv[c];
                }
            }
        } else {
            for (int64_t k = 0; k < K; ++k) {
                const T* w = W + k * ldw + n0;
                V wv[CV];
                for (int c = 0; c < CV; ++c) wv[c] = rem[c] > 0 ? ld(w + c * L, rem[c]) : V{};
                for (int b = 0; b < NB; ++b) {
                    const T xv = X[b * ldx + k];
                    for (int c = 0; c < CV; ++c) acc[b][c] += xv * wv[c];
                }
            }
        }
        for (int b = 0; b < NB; ++b)
            for (int c = 0; c < CV; ++c) {
                if (rem[c] <= 0) continue;
                T* yp = Y + b * ldy + n0 + c * L;
                V v = acc[b][c];
                if (beta != T(0)) v += beta * ld(yp, rem[c]);
                st(yp, v, rem[c]);
            }
    }
}

// y[n] = sum_k W[n, k] x[k] (+ beta y[n]) for a row-major W: L rows at a time (then four,
// then one), each a vector accumulator over k; W streams once, x stays in L1.
template <class T>
void gemv_rows(int64_t N, int64_t K, const T* W, int64_t ldw, const T* x, T beta, T* y) {
    typedef VT<T> V;
    constexpr int L = VL<T>;
    const int64_t K8 = K / L * L;
    int64_t n = 0;
    auto hsum = [](V v) { T s = 0; for (int i = 0; i < L; ++i) s += v[i]; return s; };
    // L rows at a time, summed across lanes together (hsum_rows): the step's short rows
    // (I, H of a few dozen) spent most of their time in per-row horizontal sums (perf: 79%
    // of an LSTM step at I=32 H=64; 2.9 -> 2.1 us a call from Python).
    if (K8 > 0)
    for (; n + L <= N; n += L) {
        V acc[L];
        for (int r = 0; r < L; ++r) acc[r] = V{};
        for (int64_t k = 0; k < K8; k += L) {
            const V xv = ld(x + k, L);
            for (int r = 0; r < L; ++r) acc[r] += ld(W + (n + r) * ldw + k, L) * xv;
        }
        V s = hsum_rows<T>(acc);
        if (K8 < K) {
            T tail[L];
            for (int r = 0; r < L; ++r) {
                T t = 0;
                for (int64_t k = K8; k < K; ++k) t += W[(n + r) * ldw + k] * x[k];
                tail[r] = t;
            }
            s += ld(tail, L);
        }
        if (beta != T(0)) s += beta * ld(y + n, L);
        st(y + n, s, L);
    }
    for (; n + 4 <= N; n += 4) {
        const T* w0 = W + n * ldw;
        const T* w1 = w0 + ldw;
        const T* w2 = w1 + ldw;
        const T* w3 = w2 + ldw;
        V a0{}, a1{}, a2{}, a3{};
        for (int64_t k = 0; k < K8; k += L) {
            const V xv = ld(x + k, L);
            a0 += ld(w0 + k, L) * xv;
            a1 += ld(w1 + k, L) * xv;
            a2 += ld(w2 + k, L) * xv;
            a3 += ld(w3 + k, L) * xv;
        }
        T s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
        for (int64_t k = K8; k < K; ++k) {
            s0 += w0[k] * x[k]; s1 += w1[k] * x[k]; s2 += w2[k] * x[k]; s3 += w3[k] * x[k];
        }
        if (beta != T(0)) { s0 += beta * y[n]; s1 += beta * y[n + 1]; s2 += beta * y[n + 2]; s3 += beta * y[n + 3]; }
        y[n] = s0; y[n + 1] = s1; y[n + 2] = s2; y[n + 3] = s3;
    }
    for (; n < N; ++n) {
        const T* w0 = W + n * ldw;
        V a0{};
        for (int64_t k = 0; k < K8; k += L) a0 += ld(w0 + k, L) * ld(x + k, L);
        T s0 = hsum(a0);
        for (int64_t k = K8; k < K; ++k) s0 += w0[k] * x[k];
        y[n] = s0 + (beta != T(0) ? beta * y[n] : T(0));
    }
}

// y[n] = sum_k W[n, k] x[k] for a row-major W read as one stream: row after row, each
// with two vector accumulators (even and odd steps of k), L rows' sums across lanes together.
// For long rows from the L3 or memory (the batch-1 in-place product, the streaming step's
// rows of 512 and more): the hardware prefetchers follow one sequential stream best. On two
// Zen 4 (EPYC, 1 MiB L2 a core) vCPUs, a harness reading 8 MiB a thread a step (the LSTM
// I=H=1024's W_hh) after reading 8 MiB more (W_ih): 16 rows interleaved (gemv_rows) 4.8 ms for
// 25 steps, 8 rows 3.4, 4 rows 3.5, one row with two accumulators 2.5-2.6, one row with four
// or eight 3.9-4.6. The layer, T=25 B=1 I=H=1024, two threads (ms, gemv_rows / this):
// inference LSTM 8.7-9.4 / 5.4-5.6, GRU 6.1-6.5 / 3.4; one `step` LSTM 0.70-0.80 / 0.45-0.48
// (against three rows at a time, gemv_nt), GRU 0.30 / 0.25-0.28.
template <class T>
void gemv_stream(int64_t N, int64_t K, const T* W, int64_t ldw, const T* x, T* y) {
    typedef VT<T> V;
    constexpr int L = VL<T>;
    const int64_t K2 = K / (2 * L) * (2 * L), K1 = K / L * L;
    auto row = [&](const T* w) {   // the row's products, summed over k in L lanes
        V a0{}, a1{};
        for (int64_t k = 0; k < K2; k += 2 * L) {
            a0 += ld(w + k, L) * ld(x + k, L);
            a1 += ld(w + k + L, L) * ld(x + k + L, L);
        }
        if (K1 > K2) a0 += ld(w + K2, L) * ld(x + K2, L);
        if (K > K1) a1 += ld(w + K1, K - K1) * ld(x + K1, K - K1);
        return a0 + a1;
    };
    int64_t n = 0;
    for (; n + L <= N; n += L) {
        V acc[L];
        for (int r = 0; r < L; ++r) acc[r] = row(W + (n + r) * ldw);
        st(y + n, hsum_rows<T>(acc), L);
    }
    for (; n < N; ++n) {
        const V a = row(W + n * ldw);
        T s = 0;
        for (int i = 0; i < L; ++i) s += a[i];
        y[n] = s;
    }
}

template <class T>
void small_nt(int64_t B, int64_t N, int64_t K, const T* W, int64_t ldw, const T* X, int64_t ldx,
              T* Y, int64_t ldy, T beta = T(0)) {
    switch (B) {
        case 1: gemv_rows<T>(N, K, W, ldw, X, beta, Y); break;
        case 2: gemv_nt<T, 2>(N, K, W, ldw, X, ldx, Y, ldy, beta); break;
        case 3: gemv_nt<T, 3>(N, K, W, ldw, X, ldx, Y, ldy, beta); break;
        default: gemv_nt<T, 4>(N, K, W, ldw, X, ldx, Y, ldy, beta); break;
    }
}

template <class T>
void small_nn(int64_t B, int64_t K, int64_t N, const T* W, int64_t ldw, const T* X, int64_t ldx,
              T* Y, int64_t ldy, T beta = T(0)) {
    switch (B) {
        case 1: gemv_nn<T, 1>(K, N, W, ldw, X, ldx, Y, ldy, beta); break;
        case 2: gemv_nn<T, 2>(K, N, W, ldw, X, ldx, Y, ldy, beta); break;
        case 3: gemv_nn<T, 3>(K, N, W, ldw, X, ldx, Y, ldy, beta); break;
        default: gemv_nn<T, 4>(K, N, W, ldw, X, ldx, Y, ldy, beta); break;
    }
}

// GEMMs with few rows of A (M <= SMALL_M) read B in place instead of packing it: packing
// a large weight matrix would cost more than the product. Columns are split over threads.
constexpr int64_t SMALL_M = 32;
constexpr int64_t SMALL_M_KC_BYTES = 32 * 1024;

template <class T>
void gemm_small_m(bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                  int64_t ldb, T beta, T* C, int64_t ldc) {
    const int64_t blk = tb ? 32 : 128;                 // rows of B^T (columns of C) per task
    const int64_t nb = ceil_div(N, blk);
    auto task = [&](int64_t i) {
        const int64_t n0 = i * blk, nn = N - n0 < blk ? N - n0 : blk;
        // B not transposed, several passes of four rows of A: the task's column block of B
        // (K rows of nn elements, each a short run of its own row) is taken SMALL_M_KC_BYTES
        // at a time by every pass, so the passes after the first read it from the L1. Each
        // pass reading all K rows took the block from the L3 or memory every time, in runs
        // too short for the prefetchers. Measured on the AVX-512 Xeon (2 MiB of L2 a core),
        // training step, two threads, alternating processes: LSTM T=25 B=1 I=H=1024 (dx =
        // dG W_ih, M=25, K=4096: 4 ms -> 1.8) 24.0-24.6 -> 21.0-21.2 ms; GRU 15.5 -> 13.2-13.7;
        // RNN 3.3 -> 2.7; LSTM T=16 B=2 I=H=512 3.88 -> 3.57; 16 KiB and 32 KiB alike, 64 KiB
        // and 128 KiB slower, 256-512 columns a task no faster.
        if (tb) {
            for (int64_t m = 0; m < M; m += 4)
                small_nt<T>(M - m < 4 ? M - m : 4, nn, K, B + n0 * ldb, ldb, A + m * lda, lda, C + m * ldc + n0,
                            ldc, beta);
            return;
        }
        const int64_t kc_rows = SMALL_M_KC_BYTES / (nn * (int64_t)sizeof(T));
        const int64_t kc = M > 4 ? (kc_rows > 16 ? kc_rows : 16) : K;
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
            const int64_t kk = K - k0 < kc ? K - k0 : kc;
            for (int64_t m = 0; m < M; m += 4)
                small_nn<T>(M - m < 4 ? M - m : 4, kk, nn, B + k0 * ldb + n0, ldb, A + m * lda + k0, lda,
                            C + m * ldc + n0, ldc, k0 == 0 ? beta : T(1));
        }
    };
#ifdef _OPENMP
    const int nth = threads_for_kernels();
    if (nth > 1 && nb > 1 && 2.0 * M * N * K > 2.0e5 && !omp_in_parallel()) {
#pragma omp parallel for schedule(static) num_threads(nth)
        for (int64_t i = 0; i < nb; ++i) task(i);
        return;
    }
#endif
    for (int64_t i = 0; i < nb; ++i) task(i);
}

// The input projection of few rows (gemm_xwt's contract) as dot products along k: a tile of
// XD_TM rows of X against XD_TN rows of W (one accumulator a pair, lanes over k; the W rows
// read from L1 or L2 by every tile of X rows after the first, and the next block of W's rows
// prefetched into the L2 a share a tile), each pair's lanes summed once a tile. No panel of X
// to pad or pack, and W read once whatever the rows, where gemm_xwt pads the rows of X to whole
// panels (32 for float) and takes a few left over in passes of four over W, each a read of W
// from memory. Taken with 512-bit registers (24 accumulators need 32 of them) for 5 or more
// rows with I >= 512 that do not fill whole panels, and for whole panels too from I = 1024
// (xwt_dots_take). Measured on a Zen 4 (two threads, one process, the choice switched between
// alternating rounds; layer time, dots / gemm_xwt): LSTM I=H=1024 B=1 T=8 0.79, T=16 0.78, T=25
// 0.91, B=2 T=25 0.86; GRU T=25 0.92, RNN 0.86; LSTM I=512 H=512 T=25 0.91, I=1024 H=256 T=25
// 0.85; phases of LSTM T=25: projection 2.07 -> 1.52 ms a thread (1.82 without the prefetch).
// Whole panels (blocks of 64 rows): I=H=1024 LSTM B=4 T=25 (64 + 36 rows; 36 by dots either
// way) 0.94, GRU 0.975, RNN 0.975, LSTM B=2 T=32 0.95, B=1 T=64 0.96, GRU 0.97; I=H=512 LSTM
// B=4 T=16 0.945, B=1 T=64 0.99; but GRU I=H=768 B=2 T=32 1.036. With I < 512 not taken:
// I=H=256 T=12 1.07, I=256 H=1024 T=25 0.95, I=128 H=2048 T=12 0.98, GRU I=H=128 T=12 1.09
// (W's slice in the L2, where the panels do well).
constexpr int XD_TM = 4, XD_TN = 6;
template <class T, int TM, int TN>
inline void xwt_dot_tile(int64_t K, const T* __restrict w, int64_t ldw, const T* __restrict x, int64_t ldx,
                         VT<T>* out) {
    typedef VT<T> V;
    constexpr int L = VL<T>;
    V acc[TM][TN];
    for (int t = 0; t < TM; ++t)
        for (int n = 0; n < TN; ++n) acc[t][n] = V{};
    auto step = [&](int64_t k, int64_t len) __attribute__((always_inline)) {
        V wv[TN];
        for (int n = 0; n < TN; ++n) wv[n] = ld(w + n * ldw + k, len);
        for (int t = 0; t < TM; ++t) {
            const V xv = ld(x + t * ldx + k, len);
            for (int n = 0; n < TN; ++n) acc[t][n] += xv * wv[n];
        }
    };
    int64_t k = 0;
    for (; k + L <= K; k += L) step(k, L);
    if (k < K) step(k, K - k);   // (zero filled past K)
    for (int t = 0; t < TM; ++t)
        for (int n = 0; n < TN; ++n) out[t * TN + n] = acc[t][n];
}
template <class T> inline bool xwt_dots_take(int64_t M, int64_t K) {
    if constexpr (VB < 64) return false;
    return M >= 5 && K >= 512 && (M % NR<T> != 0 || K >= 1024);
}
template <class T>
void gemm_xwt_dots(int64_t M, int64_t N, int64_t K, const T* X, int64_t ldx, int G, const T* W, int64_t wg,
                   int64_t ldw, const T* bias, int64_t bg, T* C, int64_t cg, int64_t ldc) {
    typedef VT<T> V;
    constexpr int L = VL<T>;
    constexpr int NV = (XD_TM * XD_TN + L - 1) / L * L;   // accumulators, padded to whole sums
    for (int g = 0; g < G; ++g) {
        const T* wgp = W + g * wg * ldw;
        const T* bgp = bias ? bias + g * bg : nullptr;
        T* cgp = C + g * cg;
        for (int64_t n0 = 0; n0 < N;) {
            const int tn = N - n0 >= XD_TN ? XD_TN : 1;
            // the next block of W's rows into the L2, a share with each tile of X's rows
            const bool last = n0 + tn >= N;
            const char* nxt = reinterpret_cast<const char*>(!last ? wgp + (n0 + tn) * ldw
                                                            : g + 1 < G ? W + (g + 1) * wg * ldw : nullptr);
            const int64_t nrows = std::min<int64_t>(XD_TN, last ? N : N - n0 - tn);
            const int64_t nbytes = ((nrows - 1) * ldw + K) * (int64_t)sizeof(T);
            const int64_t share = (ceil_div(nbytes, ceil_div(M, (int64_t)XD_TM)) + 63) / 64 * 64;
            int64_t pfo = 0;
            for (int64_t m0 = 0; m0 < M; m0 += XD_TM) {
                const int tm = (int)(M - m0 < XD_TM ? M - m0 : XD_TM);
                if (nxt)
                    for (int64_t e = pfo + share; pfo < e && pfo < nbytes; pfo += 64) __builtin_prefetch(nxt + pfo, 0, 2);
                V acc[NV] = {};
                const T* wn = wgp + n0 * ldw;
                const T* xm = X + m0 * ldx;
                auto tile = [&](auto regs) {   // tm rows of X against TN rows of W
                    constexpr int TN = decltype(regs)::n;
                    switch (tm) {
                        case XD_TM: xwt_dot_tile<T, XD_TM, TN>(K, wn, ldw, xm, ldx, acc); break;
                        case 3: xwt_dot_tile<T, 3, TN>(K, wn, ldw, xm, ldx, acc); break;
                        case 2: xwt_dot_tile<T, 2, TN>(K, wn, ldw, xm, ldx, acc); break;
                        default: xwt_dot_tile<T, 1, TN>(K, wn, ldw, xm, ldx, acc); break;
                    }
                };
                if (tn == XD_TN) tile(Regs<XD_TN>{});
                else tile(Regs<1>{});
                alignas(64) T sums[NV];
                for (int i = 0; i < tm * tn; i += L) {   // the sums of the pairs used
                    const V s = hsum_rows<T>(acc + i);
                    std::memcpy(sums + i, &s, sizeof s);
                }
                for (int t = 0; t < tm; ++t)
                    for (int n = 0; n < tn; ++n)
                        cgp[(m0 + t) * ldc + n0 + n] = sums[t * tn + n] + (bgp ? bgp[n0 + n] : T(0));
            }
            n0 += tn;
        }
    }
}

// The input projection, every gate g < G: C[m, g cg + n] = sum_k X[m, k] W[g wg + n, k]
// (+ bias[g bg + n]) for m < M, n < N, with the rows of the row-major W (stride ldw) read
// where they lie, so nothing derived from W_ih is kept or hashed. Roles swapped against
// gemm_pb: MR rows of W are the micro-kernel's in-place operand (read once from memory for
// XCH rows of X, then from L1) and the rows of X, packed once per XCH of them into panels of
// NR (xp: packed_b_size<T>(K, min(M, XCH)) elements), its panels; each tile is written back
// transposed. A last few rows of X (under half a panel) go through small_nt, up to four per
// pass over W, instead of a mostly empty panel.
constexpr int64_t XCH = 64;
template <class T>
void gemm_xwt(int64_t M, int64_t N, int64_t K, const T* X, int64_t ldx, int G, const T* W, int64_t wg,
              int64_t ldw, const T* bias, int64_t bg, T* C, int64_t cg, int64_t ldc, T* xp) {
    constexpr int nr = NR<T>;
    alignas(64) T tmp[MR * nr];
    for (int64_t c0 = 0; c0 < M; c0 += XCH) {
        const int64_t mc = M - c0 < XCH ? M - c0 : XCH;
        if (xwt_dots_take<T>(mc, K)) {                // (see gemm_xwt_dots)
            gemm_xwt_dots<T>(mc, N, K, X + c0 * ldx, ldx, G, W, wg, ldw, bias, bg, C + c0 * ldc, cg, ldc);
            continue;
        }
        int64_t mp = mc / nr * nr;                    // rows of X through the micro-kernel
        if (mc - mp >= nr / 2) mp = mc;
        const int64_t np = ceil_div(mp, nr);
        if (mp > 0) pack_b<T>(true, K, mp, X + c0 * ldx, ldx, xp);
        for (int g = 0; g < G; ++g) {
            const T* wgp = W + g * wg * ldw;
            const T* bgp = bias ? bias + g * bg : nullptr;
            T* cgp = C + g * cg;
            for (int64_t n0 = 0; n0 < N && mp > 0; n0 += MR) {
                const int mr = (int)(N - n0 < MR ? N - n0 : MR);
                for (int64_t p = 0; p < np; ++p) {
                    const int64_t m0 = p * nr, mm = mp - m0 < nr ? mp - m0 : nr;
                    micro_dispatch<T, true>(mr, K, wgp + n0 * ldw, xp + p * K * nr, tmp, nr, nr, T(1), T(0), ldw);
                    for (int r = 0; r < mr; ++r) {
                        const T bv = bgp ? bgp[n0 + r] : T(0);
                        T* cc = cgp + (c0 + m0) * ldc + n0 + r;
                        for (int64_t m = 0; m < mm; ++m) cc[m * ldc] = tmp[r * nr + m] + bv;
                    }
                }
            }
            // The rows left over (fewer than half a panel), up to four per pass over W.
            for (int64_t m = c0 + mp; m < c0 + mc; m += 4) {
                const int64_t rows = c0 + mc - m < 4 ? c0 + mc - m : 4;
                small_nt<T>(rows, N, K, wgp, ldw, X + m * ldx, ldx, cgp + m * ldc, ldc);
                for (int64_t r = 0; r < rows && bgp; ++r) add_row<T>(N, bgp, cgp + (m + r) * ldc);
            }
        }
    }
}

// ------------------------------------------------------------------ threads over units
// The recurrence runs in one parallel region per direction. Each thread owns a slice of
// the hidden units (and of the output features): it packs its slice of the recurrent
// weights (or finds it packed by an earlier call, PackSet), keeps it in its own cache,
// computes its gates every step and meets the others at one barrier per step (two for the
// variants that need a whole vector midway).
struct Part { int64_t lo, hi; int64_t size() const { return hi - lo; } };

inline Part part(int64_t n, int nth, int tid, int64_t align) {
    const int64_t blocks = ceil_div(n, align);
    const int64_t b0 = blocks * tid / nth, b1 = blocks * (tid + 1) / nth;
    const int64_t lo = b0 * align < n ? b0 * align : n;
    const int64_t hi = b1 * align < n ? b1 * align : n;
    return {lo, hi};
}

inline int rec_threads(int64_t B, int G, int64_t H, int64_t P) {
    const int avail = threads_for_kernels();
    const double work = (double)B * G * H * P;     // multiply-adds per step
    if (avail <= 1 || work < TEAM_MIN_MACS) return 1;
    int64_t n = avail < 64 ? avail : 64;
    const int64_t by_units = H / 16 > 1 ? H / 16 : 1;
    if (n > by_units) n = by_units;
    return (int)n;
}

// The barrier of a run_team team. A team of one has none: run_team then calls the body
// directly, and an `omp barrier` there would bind to an enclosing parallel region of the
// caller's (a C++ program calling rnncore from one of its OpenMP threads), where the other
// threads never meet it: a deadlock.
inline void barrier(int team) {
#ifdef _OPENMP
    if (team > 1) {
#pragma omp barrier
    }
#endif
}

// The per-step synchronisation of a recurrence team: each thread publishes the number of
// barriers it has arrived at in a cache line of its own and waits until every other thread's
// count has reached its own, spinning with pause, then yielding (a team larger than the
// cores must not spin away the time slice of the thread it waits for). A step's barrier then
// costs one transfer of a line from the last thread to arrive to each waiter: with one shared
// counter and a sense flag (the barrier before) it cost two in a row, the counter's
// read-modify-write and then the flag (two Xeon cores under KVM: ~140 ns a line between the
// cores). GCC atomics on plain integers: no standard library template in these per-ISA units.
// Every thread of the team calls join(team) before its first arrive: they all store the
// same values, so no thread has to wait for another to set the barrier up.
// Pauses a waiting thread spins before it yields: few where a team of `team` threads outnumbers
// the CPUs (the thread waited for may need this one's time slice).
inline int spin_limit(int team) {
    static const long cpus = sysconf(_SC_NPROCESSORS_ONLN);   // reads a /sys file: once
    return cpus > 0 && team > cpus ? 16 : 4000;
}
// Spins until done() holds: pause, and yield after `limit` pauses.
template <class F> inline void spin_until(F&& done, int limit) {
    for (int spin = 0; !done(); ++spin) {
#if defined(__SSE2__)
        _mm_pause();
#endif
        if (spin > limit) sched_yield();
    }
}

// Waits until a count published by another thread (release) reaches `want` (acquire).
inline void await_count(const int64_t* count, int64_t want) {
    spin_until([&] { return __atomic_load_n(count, __ATOMIC_ACQUIRE) >= want; }, spin_limit(2));
}
// The layer pipeline: waits until the layer below has written `steps` steps of this job's x
// (its y_ready; nothing to wait for without one).
template <class T> inline void await_input(const DirJob<T>& j, int64_t steps) {
    if (j.x_ready) await_count(j.x_ready, steps);
}

// ------------------------------------------------------------------ the exchange pages
// A team's threads pass each other the state h at every step: the owner's writes take its
// lines from the others' caches and their reads take them back, a few transfers a step whose
// latency depends on where the line's physical page is homed. In a KVM guest of a Xeon (two
// vCPUs, one NUMA node seen) a round trip between the two cores took 100-250 ns by page, steady
// within a process (a ping-pong over 16 pages, 8 times in 40 s), so that the inference of
// T=100 B=1 I=128 H=256 took 156-210 us by process (RNN; the kept weights' pages made no
// difference, the page of the ring of h all of it: 164 / 211 us on two pages of one process).
// So a team of two passes h through the candidate page (of ExchangeBlock::CAND, kernels.hpp)
// with the shortest round trip between its two threads, or the two shortest where a slot
// needs a page of its own, measured once (~0.5 ms) by the first team that needs them. Where
// all pages are alike the pick changes nothing.
// Thread 0 of a team of two, before the team's allocation barrier: 1 if this team is to
// measure the candidates (then neither uses the pages this call), 2 if it may use them (now
// busy until exchange_release), 0 otherwise.
inline int exchange_claim() {
    ExchangeBlock& x = exchange_block();
    int want = 0;
    if (__atomic_compare_exchange_n(&x.state, &want, 1, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        x.cand = static_cast<char*>(std::aligned_alloc(ExchangeBlock::PAGE, ExchangeBlock::CAND * ExchangeBlock::PAGE));
        if (!x.cand) {
            __atomic_store_n(&x.state, 2, __ATOMIC_RELEASE);
            return 0;
        }
        std::memset(x.cand, 0, ExchangeBlock::CAND * ExchangeBlock::PAGE);
        return 1;
    }
    if (want != 2 || x.chosen[0] < 0) return 0;
    int idle = 0;
    if (!__atomic_compare_exchange_n(&x.busy, &idle, 1, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) return 0;
    __atomic_add_fetch(&x.uses, 1, __ATOMIC_RELAXED);
    return 2;
}
inline void exchange_release() { __atomic_store_n(&exchange_block().busy, 0, __ATOMIC_RELEASE); }
inline char* exchange_page(int k) {   // the k-th fastest (k < 2), once measured
    const ExchangeBlock& x = exchange_block();
    return x.cand + x.chosen[k] * ExchangeBlock::PAGE;
}
// Both threads of the team (after the barrier that shared exchange_claim's 1): ROUNDS round
// trips on the first line of every candidate page; thread 0 keeps the two fastest.
inline void exchange_measure(int tid) {
    ExchangeBlock& x = exchange_block();
    for (int c = 0; c < ExchangeBlock::CAND; ++c) {
        int64_t* f = reinterpret_cast<int64_t*>(x.cand + c * ExchangeBlock::PAGE);
        timespec t0, t1;
        if (tid == 0) clock_gettime(CLOCK_MONOTONIC, &t0);
        for (int64_t r = 1; r <= ExchangeBlock::ROUNDS; ++r) {
            if (tid == 0) {
                __atomic_store_n(f, 2 * r - 1, __ATOMIC_RELEASE);
                spin_until([&] { return __atomic_load_n(f, __ATOMIC_ACQUIRE) == 2 * r; }, spin_limit(2));
            } else {
                spin_until([&] { return __atomic_load_n(f, __ATOMIC_ACQUIRE) == 2 * r - 1; }, spin_limit(2));
                __atomic_store_n(f, 2 * r, __ATOMIC_RELEASE);
            }
        }
        if (tid != 0) continue;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        x.round_trip_ns[c] = ((int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec)) /
                             ExchangeBlock::ROUNDS;
    }
    if (tid != 0) return;
    for (int k = 0; k < 2; ++k) {
        int best = -1;
        for (int c = 0; c < ExchangeBlock::CAND; ++c)
            if (c != x.chosen[0] && (best < 0 || x.round_trip_ns[c] < x.round_trip_ns[best])) best = c;
        x.chosen[k] = best;
    }
    __atomic_store_n(&x.state, 2, __ATOMIC_RELEASE);
}

struct StepBarrier {
    struct alignas(64) Count {
        int64_t v = 0;
    };
    Count arrived[MAX_TEAM];   // per thread: the barriers it has arrived at
    int n = 1;
    int spins = 4000;   // pauses before yielding; few when the team outnumbers the CPUs
    // A thread's own side: its index in the team and its count of arrivals.
    struct Local {
        int tid = 0;
        int64_t epoch = 0;
        explicit Local(int t) : tid(t) {}
    };
    void join(int team) {   // team <= MAX_TEAM (rec_threads caps the recurrence's teams)
        __atomic_store_n(&n, team, __ATOMIC_RELAXED);
        __atomic_store_n(&spins, spin_limit(team), __ATOMIC_RELAXED);
    }
    void wait(Local& local) {
        arrive(local);
        await(local);
    }
    // Split phase: arrive (everything this thread wrote before is published), do work that
    // needs nobody else, then await the others.
    void arrive(Local& local) {
        if (__atomic_load_n(&n, __ATOMIC_RELAXED) <= 1) return;
        local.epoch += 1;
        __atomic_store_n(&arrived[local.tid].v, local.epoch, __ATOMIC_RELEASE);
    }
    void await(const Local& local) {
        const int team = __atomic_load_n(&n, __ATOMIC_RELAXED);
        if (team <= 1) return;
        const int limit = __atomic_load_n(&spins, __ATOMIC_RELAXED);
        for (int i = 0; i < team; ++i)
            if (i != local.tid)
                spin_until([&] { return __atomic_load_n(&arrived[i].v, __ATOMIC_ACQUIRE) >= local.epoch; },
                           limit);
    }
};

// The opt-in phase profile (runtime.hpp: phase_times): a thread's clock, which charges the
// time since its last mark to a phase. Off, a mark is one predictable branch.
struct PhaseClock {
    bool on;
    int tid;
    int64_t t = 0;
    static int64_t now() {
        timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    }
    explicit PhaseClock(int id) : on(phase_timing()), tid(id) { if (on) t = now(); }
    void mark(int phase) {
        if (!on) return;
        const int64_t n = now();
        phase_add(phase, tid, n - t);
        t = n;
    }
};

template <class F> void run_team(int nth, F&& body) {
#ifdef _OPENMP
    if (nth > 1) {
#pragma omp parallel num_threads(nth)
        body(omp_get_thread_num(), omp_get_num_threads());
        return;
    }
#endif
    body(0, 1);
}

// A thread of the team whose allocation failed raises the flag; after one barrier every
// thread sees whether any did (so all skip the work together) and the caller throws.
inline void raise_failure(int* failed) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
    *failed = 1;
}
inline bool team_failed(int* failed, int team) {
    barrier(team);
    return *failed != 0;
}

// Per-thread scratch allocated inside the region: nullptr for every thread if any failed.
template <class T> T* team_scratch(int64_t need, int* failed, int team) {
    T* mem = static_cast<T*>(aligned_buffer((size_t)need * sizeof(T)));
    if (!mem) raise_failure(failed);
    if (team_failed(failed, team)) {
        std::free(mem);
        return nullptr;
    }
    return mem;
}

// Per-thread scratch kept from call to call: two buffers a thread (the calling thread holds
// a call's folded biases and its team share at once) of up to KEEP_SCRATCH bytes. A small
// call (the streaming shapes) otherwise paid per call an allocation above the allocator's
// fast bins, the memset of its prefetch pad and the consolidation of its free (perf, T=1 B=1
// I=32 H=64 RNN from Python: ~20% of the call). Larger buffers are allocated per call.
constexpr size_t KEEP_SCRATCH = size_t(256) << 10;
struct KeptScratch {
    void* p[2] = {nullptr, nullptr};
    size_t bytes[2] = {0, 0};
    bool busy[2] = {false, false};
    ~KeptScratch() { std::free(p[0]); std::free(p[1]); }
};
inline KeptScratch& kept_scratch() {
    thread_local KeptScratch k;
    return k;
}
inline void* scratch_buffer(size_t bytes) {
    if (bytes <= KEEP_SCRATCH) {
        KeptScratch& k = kept_scratch();
        for (int i = 0; i < 2; ++i) {
            if (k.busy[i]) continue;
            if (k.bytes[i] < bytes) {
                std::free(k.p[i]);
                const size_t grown = (bytes + 4095) / 4096 * 4096;
                k.p[i] = aligned_buffer(grown);
                k.bytes[i] = k.p[i] ? grown : 0;
                if (!k.p[i]) return nullptr;
            }
            k.busy[i] = true;
            return k.p[i];
        }
    }
    return aligned_buffer(bytes);
}
// Releases what scratch_buffer returned (to this thread's kept pair, or to the allocator).
inline void scratch_free(void* p) {
    if (!p) return;
    KeptScratch& k = kept_scratch();
    for (int i = 0; i < 2; ++i)
        if (k.busy[i] && k.p[i] == p) {
            k.busy[i] = false;
            return;
        }
    std::free(p);
}

// Carves the per-thread scratch into N buffers of the given sizes (0: nullptr) from one
// allocation (scratch_buffer); returns it (to release with scratch_free), or nullptr if any
// thread failed.
template <class T, int N> T* team_carve(const int64_t (&sizes)[N], T* (&out)[N], int* failed, int team) {
    int64_t total = 0;
    for (int i = 0; i < N; ++i) total += round16(sizes[i]);
    T* mem = static_cast<T*>(scratch_buffer((size_t)(total > 0 ? total : 16) * sizeof(T)));
    if (!mem) raise_failure(failed);
    if (team_failed(failed, team)) {
        scratch_free(mem);
        mem = nullptr;
    }
    int64_t off = 0;
    for (int i = 0; i < N; ++i) {
        out[i] = mem && sizes[i] > 0 ? mem + off : nullptr;
        off += round16(sizes[i]);
    }
    return mem;
}

// The large GEMM, blocked as in GotoBLAS/BLIS: a KC x NC block of B is packed once (its
// panels shared out over the threads, the block sized to stay in every core's L2), then each
// thread packs an MC x KC block of A and runs each of its MR-row tiles against every B panel
// of the block: a packed tile (the broadcast operand, 18 KB at KC=384) stays in L1 while the
// B panels (the loaded operand, 48 KB each) stream from L2, as BLIS keeps its broadcast
// micro-panel in L1.
// A is read from memory once per B block instead of once per B panel, and both packings run
// in parallel.
constexpr int64_t MC = 16 * MR;                                 // rows of A per L2 block
constexpr int64_t OWN_B_ROWS = 384;   // gemm_parts: rows a thread at most for a B block of its own
// K block when A is read in place (no A block to keep in L2, so only the B panel and the
// passes over C matter): on the AVX-512 Xeon 1024 against 384, M=1600 K=1024 N=128 259 -> 303
// GFLOP/s, M=6400 N=256 K=2048 279 -> 299, 1536^3 295 -> 299; with a packed (transposed) A
// 384 stays best (M=1024 N=256 K=1600: 265 against 248). Re-measured with the A tile outer
// (below): 1024 still best for A in place (one core, M=1600 N=4096 K=1024: 151 against 148 at
// 384; the tile's 12 rows then come from L2, the B panel does not fit L1 either way).
constexpr int64_t KC_INPLACE = VB >= 64 ? 1024 : KC;
// Columns of B per block: ~1.25 MB packed, so the block stays in L2 (2 MB) beside the A
// tiles and C. With the B panels outer and 2 MB blocks, each tile and panel came from L2 on
// every call; swapping the loops with 1 MB blocks, measured on the AVX-512 Xeon, two threads:
// transposed A M=4096 N=1024 K=1600 (the weight gradient of a wide LSTM) 251 -> 296 GFLOP/s,
// 1536^3 287 -> 307, A in place M=1600 N=4096 K=1024 293 -> 301. 1.25 MB instead of 1 takes
// N=768 at KC=384 (LSTM H=512 with I=256: dW_ih | dW_hh) in one block, packing the transposed
// A once: M=2048 N=768 K=6400 290 -> 304, the other shapes unchanged.
template <class T> inline int64_t gemm_nc(int64_t kc) {
    return (int64_t)(5u << 18) / (kc * (int64_t)sizeof(T)) / NR<T> * NR<T>;
}

// One part of the columns of a GEMM: C[:, part] = op(A) @ op(B_part). Several parts share
// one pass over A (the weight gradients of W_ih and W_hh against one packing of dG^T).
template <class T> struct GemmPart {
    const T* B; int64_t ldb;
    T* C; int64_t ldc;
    int64_t n;                 // columns
};

#if RNNCORE_VEC_BYTES == 64 && defined(__AVX512F__) && defined(__GNUC__) && defined(__x86_64__) && \
    defined(__linux__) && !defined(RNNCORE_NO_AMX)
#define RNNCORE_AMX_GEMM 1
// The GEMMs the tile unit takes (amx_gemm_parts): alpha 1, beta 0 or 1, no dimension under 32,
// at least AMX_MIN_FLOPS (2 M N K) on one thread and AMX_MIN_FLOPS_TEAM on more, below which packing three parts costs
// more than the tile unit saves. AMX time over the FMA GEMM's, one process, alternating: one
// thread 4.2 MFLOP 0.77-1.06, 8.4 0.77-0.85, 12 0.91, 34 0.71; two threads 4.2 1.00-1.53, 8.4
// 0.98-1.19, 12 1.09, 22 0.93, 34 0.88, 75 0.83, 230 0.68.
constexpr double AMX_MIN_FLOPS = 4.0e6, AMX_MIN_FLOPS_TEAM = 2.5e7;
// The per-step recurrent products (forward and backward) on the tile unit from this many batch
// rows (kernel16 takes a batch of 16 rows), or from AMX_HH_STREAM_MIN_B where the weights'
// three parts (1.5x the bytes) would stream from the L3 at every step while the float32 slice
// stays mostly in the L2 (amx_rows_enough). Two threads, AMX against FMA in one process,
// inference T=50 I=256: LSTM H=512 (2 MiB a thread) B=16 0.97, B=24 1.04, B=32 0.89, B=48 0.83;
// GRU H=512 B=16 1.05, B=32 0.86; in the L2 (LSTM and GRU H=256) B=16 0.70-0.81, B=12 0.89-0.91,
// B=8 1.01-1.04; from the L3 either way (LSTM H=768, 4.5 MiB) B=16 0.89, GRU 0.91.
constexpr int64_t AMX_HH_MIN_B = 16, AMX_HH_STREAM_MIN_B = 32;
inline bool amx_rows_enough(int64_t B, int64_t fp32_bytes) {
    const bool parts_fit = split_fits(fp32_bytes * 3 / 2), fp32_near = fp32_bytes <= 2 * l2_cache_bytes();
    return B >= (parts_fit || !fp32_near ? AMX_HH_MIN_B : AMX_HH_STREAM_MIN_B);
}

#include "amx.hpp"

// The backward's per-step product dh = dG W_hh on the tile unit: columns [n0, n0 + N) of W_hh
// (Kc x P, row-major) kept in two packed blocks, its rows [0, ghx) (the reset-after GRU's r and
// z, whose gradients come from dgx) and [ghx, Kc), each in its three parts. Sizes in floats.
inline int64_t amx_dh_elems(int64_t Kc, int64_t ghx, int64_t N) {
    return (amx::packed_b_elems(ghx, N) + amx::packed_b_elems(Kc - ghx, N)) / 2;
}
inline int64_t amx_dh_a_elems(int64_t B, int64_t Kc, int64_t ghx) {   // a step's dG rows, packed
    return amx::packed_a_elems(B, ghx > Kc - ghx ? ghx : Kc - ghx) / 2;
}
inline void amx_dh_pack(const float* whh, int64_t P, int64_t Kc, int64_t ghx, int64_t n0, int64_t N, float* pk) {
    amx::bf* p = reinterpret_cast<amx::bf*>(pk);
    if (ghx > 0) amx::pack_all_b(false, ghx, N, whh + n0, P, p);
    amx::pack_all_b(false, Kc - ghx, N, whh + ghx * P + n0, P, p + amx::packed_b_elems(ghx, N));
}
// Whether a step's dh product over N columns of a (float32, fp32_bytes when packed) W_hh
// slice runs on the tile unit.
inline bool amx_dh_takes(int64_t B, int64_t N, int64_t Kc, int64_t ghx, int64_t fp32_bytes) {
    return amx_rows_enough(B, fp32_bytes) && N >= 32 && Kc - ghx >= 32 && amx_active();
}
// C[B x N] = dgt[:, :ghx] W_hh[:ghx] + dght[:, ghx:Kc] W_hh[ghx:] (columns of the packed slice).
inline void amx_dh(int64_t B, int64_t N, int64_t Kc, int64_t ghx, const float* dgt, const float* dght, int64_t LD,
                   const float* pk, float* C, int64_t ldc, float* ap) {
    const amx::bf* p = reinterpret_cast<const amx::bf*>(pk);
    amx::bf* a = reinterpret_cast<amx::bf*>(ap);
    if (ghx > 0) amx::gemm_packed_b(B, N, ghx, dgt, LD, p, C, ldc, a, false);
    amx::gemm_packed_b(B, N, Kc - ghx, dght + ghx, LD, p + amx::packed_b_elems(ghx, N), C, ldc, a, false, ghx > 0);
}

#endif

// With ta, A2 (same layout as A) gives the rows m >= msplit of op(A): the reset-after GRU's
// dW_hh, whose gate gradients' r and z columns are in dgx and its n columns in dgh.
template <class T>
void gemm_parts(bool ta, bool tb, int64_t M, int64_t K, T alpha, const T* A, int64_t lda,
                const GemmPart<T>* parts, int nparts, T beta, const T* A2 = nullptr, int64_t msplit = 0) {
    constexpr int MAXP = 4;   // parts per pass
    if (!ta) A2 = nullptr;    // (A read in place: one source)
    if (nparts > MAXP) {
        gemm_parts<T>(ta, tb, M, K, alpha, A, lda, parts, MAXP, beta, A2, msplit);
        gemm_parts<T>(ta, tb, M, K, alpha, A, lda, parts + MAXP, nparts - MAXP, beta, A2, msplit);
        return;
    }
    int64_t N = 0;
    for (int i = 0; i < nparts; ++i) N += parts[i].n;
    if (M <= 0 || N <= 0) return;
    if (K <= 0 || (!ta && M <= SMALL_M && alpha == T(1))) {
        for (int i = 0; i < nparts; ++i) {
            const GemmPart<T>& q = parts[i];
            if (q.n <= 0) continue;
            if (K > 0) {
                gemm_small_m<T>(tb, M, q.n, K, A, lda, q.B, q.ldb, beta, q.C, q.ldc);
                continue;
            }
            for (int64_t m = 0; m < M; ++m)
                for (int64_t n = 0; n < q.n; ++n)
                    q.C[m * q.ldc + n] = beta == T(0) ? T(0) : beta * q.C[m * q.ldc + n];
        }
        return;
    }
#ifdef RNNCORE_AMX_GEMM
    if constexpr (same_type<T, float>::value) {
        if (amx_active() && amx_gemm_parts(ta, tb, M, N, K, alpha, A, lda, parts, nparts, beta, A2, msplit)) return;
    }
#endif
    const int nr = NR<T>;
    // B panels of every part in sequence (a part's last panel may be partial).
    int64_t pstart[MAXP + 1] = {0};
    for (int i = 0; i < nparts; ++i) pstart[i + 1] = pstart[i] + ceil_div(parts[i].n > 0 ? parts[i].n : 0, nr);
    const int64_t npt = pstart[nparts];
    struct Pan { const T* B; T* C; int64_t ldb, ldc, n0, w; };
    auto panel = [&](int64_t p) {
        int i = 0;
        while (p >= pstart[i + 1]) ++i;
        const GemmPart<T>& q = parts[i];
        const int64_t n0 = (p - pstart[i]) * nr;
        return Pan{q.B, q.C, q.ldb, q.ldc, n0, q.n - n0 < nr ? q.n - n0 : nr};
    };
    // A not transposed is read where it lies (the micro-kernel's in-place mode: MR row
    // streams) instead of packed: measured on the AVX-512 Xeon, M=1600 K=1024 N=128 (the
    // input gradient of a training step) 198 -> 273 GFLOP/s, N=32 87 -> 142, N=1024 283 -> 294,
    // 1536^3 282 -> 288. Packing A only pays when its panels are read by many B panels and
    // the row streams are too many for the prefetchers; neither is the case here.
    const bool inplace_a = !ta;
    const int64_t kcap = inplace_a ? KC_INPLACE : KC;
    const int64_t kc = K < kcap ? K : kcap;
    const int64_t npb_cap = gemm_nc<T>(kc) / nr;              // B panels per packed block
    // B blocks of equal size (a 21-panel block and a 3-panel one left the second block's A
    // packing paid for a few panels: transposed A M=2048 N=768 K=6400 252 -> 267 GFLOP/s)
    const int64_t npb = ceil_div(npt, ceil_div(npt, npb_cap));
    // Equal A blocks of at most MC rows (a multiple of MR), so no thread gets a remnant.
    const int64_t mblocks = ceil_div(M, MC);
    const int64_t mc = ceil_div(ceil_div(M, mblocks), MR) * MR;
    int nth = 1;
#ifdef _OPENMP
    if (2.0 * (double)M * (double)N * (double)K > 2.0e5 && !omp_in_parallel()) nth = threads_for_kernels();
#endif
    T* Bp = alloc<T>(packed_b_size<T>(kc, npb * nr));
    int failed = 0;
    run_team(nth, [&](int tid, int team) {
        const int64_t mcap = ceil_div(M, MR) * MR < MC ? ceil_div(M, MR) * MR : MC;   // >= mc
        T* Ap = team_scratch<T>(inplace_a ? 16 : packed_a_size(mcap, kc), &failed, team);
        if (!Ap) return;
        // Work units: (A block, share of the B panels). Few A blocks, or a count the threads
        // do not divide: every thread takes its share of the panels of every A block (packing
        // each A block for itself).
        // Many A blocks: each thread takes an equal share of the row tiles (blocks of at most
        // MC rows; round robin over equal blocks left one thread 10% more rows at M = 1024).
        // A packed A is split by rows as soon as each thread has 8 tiles (a tile more is at
        // most 1/8 more work; packing every A block twice cost more: M=2048 N=768 K=6400
        // 267 -> 287 GFLOP/s, M=2048 N=1280 K=3200 284 -> 297, M=1200 N=256 K=800 269 -> 297).
        // One read in place keeps the panel split (M=420 N=1024 K=1024: 300 against 290).
        const bool by_rows = mblocks % team == 0 || mblocks >= 8 * team ||
                             (!inplace_a && ceil_div(M, MR) >= 8 * team);
        const int64_t nsplit = by_rows ? 1 : team;
        // Each thread packs the B panels it multiplies into a block of its own, without the
        // two barriers a shared block needs and without writing lines the other cores read
        // in the last block, where it takes a share of the panels (it packs just those) or
        // few rows (the whole block packed by each thread costs more than the barriers only
        // against many rows). Measured on the AVX-512 Xeon, two threads, with the packing
        // prefetches, alternating in one process (ms, shared / own): transposed A M=512 N=768
        // K=6400 14.2 / 13.8, M=1024 N=768 K=1600 6.6 / 6.8, M=1536 N=768 K=6400 39.8 / 40.9.
        // Against the build before both (shared, no prefetch): M=96 N=1024 K=1024 0.75 / 0.60
        // (A in place 0.74 / 0.65), M=512 N=768 K=6400 14.7 / 12.8.
        const bool own_b = team > 1 && (nsplit > 1 || ceil_div(M, team) <= OWN_B_ROWS);
        T* Bown = own_b ? team_scratch<T>(packed_b_size<T>(kc, npb * nr), &failed, team) : nullptr;
        if (own_b && !Bown) {
            std::free(Ap);
            return;
        }
        T* const Bb = own_b ? Bown : Bp;
        const Part tiles = part(ceil_div(M, MR), team, tid, 1);
        const int64_t nbl = ceil_div(tiles.size(), MC / MR);
        const Part own = nsplit == 1 ? Part{0, nbl} : Part{tid, mblocks * nsplit};
        const int64_t ustep = nsplit == 1 ? 1 : team;
        for (int64_t pb = 0; pb < npt; pb += npb) {
            const int64_t npan = npt - pb < npb ? npt - pb : npb;
            // the panels this thread packs: a share of the block, or (own_b) those it multiplies
            const int64_t pk0 = own_b && nsplit == 1 ? 0 : npan * tid / team;
            const int64_t pk1 = own_b && nsplit == 1 ? npan : npan * (tid + 1) / team;
            for (int64_t pc = 0; pc < K; pc += kc) {
                const int64_t kk = K - pc < kc ? K - pc : kc;
                const T bet = pc == 0 ? beta : T(1);
                if (!own_b) barrier(team);   // every thread is done with the previous B block
                // consecutive panels of one part packed together (pack_b reads them row by row)
                for (int64_t p = pk0; p < pk1;) {
                    const Pan q = panel(pb + p);
                    int64_t e = p + 1, w = q.w;
                    while (e < pk1 && w == (e - p) * nr) {
                        const Pan q2 = panel(pb + e);
                        if (q2.B != q.B || q2.n0 != q.n0 + w) break;
                        w += q2.w;
                        ++e;
                    }
                    pack_b(tb, kk, w, tb ? q.B + q.n0 * q.ldb + pc : q.B + pc * q.ldb + q.n0, q.ldb,
                           Bb + p * kk * nr);
                    p = e;
                }
                if (!own_b) barrier(team);   // the B block is complete
                int64_t packed_ib = -1;
                for (int64_t u = own.lo; u < own.hi; u += ustep) {
                    int64_t ib, part_i, m0, mm;
                    if (nsplit == 1) {   // the thread's own rows, in blocks of at most MC rows
                        ib = u;
                        part_i = 0;
                        const int64_t t0 = tiles.lo + tiles.size() * (u - own.lo) / nbl;
                        const int64_t t1 = tiles.lo + tiles.size() * (u - own.lo + 1) / nbl;
                        m0 = t0 * MR;
                        mm = (t1 * MR < M ? t1 * MR : M) - m0;
                    } else {
                        ib = u / nsplit;
                        part_i = u % nsplit;
                        m0 = ib * mc;
                        mm = M - m0 < mc ? M - m0 : mc;
                    }
                    if (ib != packed_ib && !inplace_a) {
                        pack_a(ta, mm, kk, ta ? A + pc * lda + m0 : A + m0 * lda + pc, lda, Ap,
                               A2 ? A2 + pc * lda + m0 : nullptr, msplit - m0);
                        packed_ib = ib;
                    }
                    const int64_t p0 = npan * part_i / nsplit, p1 = npan * (part_i + 1) / nsplit;
                    const int64_t mt = ceil_div(mm, MR);
                    for (int64_t i = 0; i < mt; ++i) {       // the tile stays in L1,
                        const int mr = (int)(mm - i * MR < MR ? mm - i * MR : MR);
                        for (int64_t p = p0; p < p1; ++p) {  // the B panels come from L2
                            const Pan q = panel(pb + p);
                            T* ct = q.C + (m0 + i * MR) * q.ldc + q.n0;
                            const T* bt = Bb + p * kk * nr;
                            if (inplace_a)
                                micro_dispatch<T, true>(mr, kk, A + (m0 + i * MR) * lda + pc, bt, ct, q.ldc,
                                                        q.w, alpha, bet, lda);
                            else
                                micro_dispatch<T>(mr, kk, Ap + i * kk * MR, bt, ct, q.ldc, q.w, alpha, bet);
                        }
                    }
                }
            }
        }
        std::free(Ap);
        std::free(Bown);
    });
    std::free(Bp);
    if (failed) throw std::bad_alloc();
}

template <class T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
    const GemmPart<T> one{B, ldb, C, ldc, N};
    gemm_parts<T>(ta, tb, M, K, alpha, A, lda, &one, 1, beta);
}

// What a cell type implies, derived once: gates G, G*H, the variant flags.
struct CellDims {
    int G;
    int64_t GH;
    bool lstm, gru, proj, gru_orig, relu;
};
inline CellDims cell_dims(int cell, int64_t H, int64_t P, bool lbr) {
    const bool lstm = cell == (int)CellType::LSTM, gru = cell == (int)CellType::GRU;
    const int G = lstm ? 4 : gru ? 3 : 1;
    return {G, G * H, lstm, gru, lstm && P != H, gru && !lbr, cell == (int)CellType::RNN_RELU};
}
// The fields under their own names (references, as a structured binding would name them). Not
// a structured binding: the recurrences' lambdas capture them, and capturing a structured
// binding is C++20 (Clang rejects or warns in C++17).
#define RNNCORE_CELL_DIMS(...)                                                                \
    const CellDims cdims_ = cell_dims(__VA_ARGS__);                                           \
    [[maybe_unused]] const int& G = cdims_.G;                                                 \
    [[maybe_unused]] const int64_t& GH = cdims_.GH;                                           \
    [[maybe_unused]] const bool &lstm = cdims_.lstm, &gru = cdims_.gru, &proj = cdims_.proj,  \
                                &gru_orig = cdims_.gru_orig, &relu = cdims_.relu

// ------------------------------------------------------------------ forward
// Training keeps the gate activations for backward. Written row-major ([T, B, G*H]), each
// thread's share of a step is G pieces of its units per batch row, 4 KB apart for H = 256:
// every row a new page, so the stores' reads for ownership miss the prefetchers (LSTM T=100
// B=16 H=256: the projection took 1.5 times as long as with a thread-local block). The
// packed path therefore writes them blocked as it projects them: per block of SB steps (as
// projected, in the direction of the recurrence) one contiguous [steps * B, G, nh] piece per
// thread, in thread order. Offset of batch row b at step t for the thread of units
// [u0, u0 + nh); gate stride nh.
inline int64_t gate_offset(int64_t TT, int64_t B, int64_t GH, int G, int64_t SB, bool rev,
                           int64_t t, int64_t b, int64_t u0, int64_t nh) {
    const int64_t q = rev ? TT - 1 - t : t;            // position in the recurrence
    const int64_t q0 = q / SB * SB;                    // first position of its block
    const int64_t ns = TT - q0 < SB ? TT - q0 : SB;    // steps in the block
    const int64_t ta = rev ? TT - q0 - ns : q0;        // first time index of the block
    return q0 * B * GH + ns * B * G * u0 + ((t - ta) * B + b) * G * nh;
}
inline int64_t fuse_steps(int64_t B) { return (FUSE_ROWS + B - 1) / B; }   // SB

// W: the element type of the packed recurrent weights (W_hh, W_hr): T, or bf16 (j.bf16).
template <class T, class W> void dir_forward_w(const DirJob<T>& j) {
    const int64_t TT = j.steps, B = j.batch, I = j.in, H = j.hid, P = j.out;
    RNNCORE_CELL_DIMS(j.cell, H, P, j.lbr);
    const int rev = j.reverse ? 1 : 0;
    const int Gk = gru_orig ? 2 : G;          // gates computed by the first recurrent product
    // W elements in units of T (the scratch is carved in T)
    auto wt = [](int64_t n) { return (n * (int64_t)sizeof(W) + (int64_t)sizeof(T) - 1) / (int64_t)sizeof(T); };

    // row-major weights read in place (a kept packed copy costs only its hash per call); bf16
    // weights are always packed (the in-place path reads the float32 rows)
    // (and it projects into `gates`, which the driver sizes for inference within SMALL_B and
    // SMALL_T only: without it the packed path, correct at any size, runs instead)
    const bool small = same_type<W, T>::value && B <= SMALL_B && TT <= (j.packed ? SMALL_T_KEPT : SMALL_T) &&
                       j.gates != nullptr;
    // Input projection gates = x @ W_ih^T + biases (b_hh folds in except for the n gate of
    // the reset-after GRU), by each thread for its own gate columns from its rows of W_ih. On
    // the packed path a block of FUSE_ROWS rows (steps * batch) ahead, inside the recurrence:
    // the block stays in its cache and, for inference, there is no [T, B, G*H] array at all.
    // The unpacked path (few rows, short) projects every step first, reading W_ih in place.
    const bool fuse = !small;
    // W_ih packed with W_hh (kept, hash-checked per call, gemm_pb) or read in place (gemm_xwt,
    // whose transposed stores cost a little per tile, more with a short inner dimension I):
    // packed where the call projects many rows (T * B) for each byte of W_ih it would hash,
    // in place otherwise. Measured on a Zen 3 (in place against packed, alternating in one
    // process): T=25 I=H=1024 B=1 LSTM 0.92, GRU 0.985, RNN 0.94, B=4 LSTM 0.93; T=100 I=128
    // H=256 B=1 LSTM 1.03, GRU 1.00, RNN 1.08, B=16 LSTM 1.08.
    const bool ih_packed = fuse && I <= IH_INPLACE_ROWS * TT * B;
    const int64_t fold = (gru && j.lbr) ? 2 * H : GH;
    T* bias = nullptr;
    if (j.w.b_ih) {
        bias = static_cast<T*>(scratch_buffer((size_t)GH * sizeof(T)));
        if (!bias) throw std::bad_alloc();
        for (int64_t k = 0; k < GH; ++k) bias[k] = j.w.b_ih[k] + (k < fold ? j.w.b_hh[k] : T(0));
    }
    // Inference (and the plain RNN's backward, which reads only h) needs no gate activations
    // afterwards: the block is projected into a small buffer of the thread's own (its gate
    // columns, SB steps), not the [T, B, G*H] array. Training projects into its blocked
    // layout in that array (gate_offset), with the same strides.
    const bool rnn = !lstm && !gru;
    const bool local_g = fuse && (j.infer || rnn);
    const bool blocked = fuse && !local_g && j.gate_team;

    const int want = rec_threads(B, G, H, P);
    const int nth1 = j.max_threads > 0 && want > j.max_threads ? j.max_threads : want;   // (see `duo`)
    // Steps per projected block. A block of the input projection is a burst of dense
    // 512-bit FMAs, and a core that runs such bursts of several microseconds drops to a lower
    // clock (the AVX-512 frequency licence) for the rest of the call and the next; the
    // per-step product at small batches, a GEMV at the L2's pace, does not. So at up to
    // FEW_FUSE_B batch rows, where W_ih's packed slice stays in the L2 with W_hh's (re-reading
    // it once a block costs L2 reads only), blocks of FEW_FUSE_ROWS rows. Measured on the
    // AVX-512 Xeon (Sapphire Rapids), core clock from a chain of dependent adds after each
    // call: RNN T=100 B=1 I=128 H=256, two threads, 3.19 GHz with blocks of 64 rows, 3.46 with
    // 16; a one-core harness of the same step (gemm_pb over a 256 KiB slice, a projection of
    // 256 columns every block): 64 rows 2.93-3.03 GHz, 32 rows 3.18-3.23, 16 and fewer
    // 3.41-3.51. One process, new/old over 5 rounds: inference T=100 I=128 H=256 RNN B=1
    // 0.91-0.92, B=4 0.99, LSTM and GRU B=1 1.00; RNN B=1 training 0.97. (The LSTM and GRU
    // stay near 3.0 GHz either way: their steps are denser.)
    const int64_t layer_w = ((int64_t)Gk * H * (gru_orig ? H : P) + (gru_orig ? H * H : 0)) * (int64_t)sizeof(W) +
                            (int64_t)G * H * I * (int64_t)sizeof(T);
    const bool few = local_g && ih_packed && B <= FEW_FUSE_B && split_fits(layer_w / nth1);
    // A layer of the layer pipeline waits for each block of its input: blocks of
    // PIPE_FUSE_ROWS rows let it start sooner (two layers I=32 H=64 T=100 B=1, us, 16 rows /
    // 8 / 4 / 2: LSTM 96.0 / 92.2 / 95.4 / 110.0, GRU H=128 258 / 248 / 250 / 295).
    // So does training's blocked layout where a team of one writes it in time order: it is then
    // the row-major [T, B, G*H] array whatever the block's steps (gate_offset), which the
    // backward reads as such (the layer pipeline runs every layer that way).
    const bool pipe_blocks = local_g || (blocked && nth1 == 1 && !rev);
    // (batch 1 with the projection spread over the steps, dir_forward_w's `spread`, where W_ih's
    // slice is re-read from the L3 at most: blocks of FEW_FUSE_ROWS too)
    const bool spread_on = spread_projection();   // (see `spread` below)
    const bool few_rows = few || (spread_on && B == 1 && local_g && ih_packed && !j.x_ready &&
                                  (int64_t)G * H * I * (int64_t)sizeof(T) <= nth1 * l2_cache_bytes() / 2);
    const int64_t rows = j.x_ready && pipe_blocks ? PIPE_FUSE_ROWS : few_rows ? FEW_FUSE_ROWS : FUSE_ROWS;
    const int64_t SB = !fuse ? 0 : (rows + B - 1) / B;
    int failed = 0;
    int xrole = 0;   // the exchange pages (exchange_claim): shared by the team after its barrier
    StepBarrier sbar;
    // A small layer's way: a layer whose recurrence runs on one thread (few multiply-adds a step,
    // up to FEW_FUSE_B batch rows) may instead
    //  - project its input on the idle core: a second thread projects the blocks of input rows
    //    (the same gemm_pb per block: the results are the same bit for bit) into a ring of
    //    IDLE_RING blocks ahead of the recurrence, which projects the first block itself and
    //    then only waits for each block's count; or
    //  - run on a team of two (inference), each thread holding half of W_hh (in its L1 where
    //    one thread's whole slice streamed from the L2), meeting at a full barrier every step.
    //    Without the split phase, whose own-rows-first order would sum the products differently,
    //    every column of every product is summed in the one thread's order (the same
    //    micro-kernel and accumulator sets: small_rows_n), so the results are the same bit for
    //    bit; the team's packed slices are kept in slot[1] and slot[2] beside the one thread's
    //    slot[0].
    // Measured on the Zen 4 machine (two vCPUs), T=100 B=1, alternating in one process, against
    // one thread: the idle core's projection at I=32 H=64 LSTM 0.862-0.884, GRU 0.864-0.887, RNN
    // 0.905-0.918 in some runs and LSTM 1.01-1.04, GRU 1.013, RNN 1.11-1.17 in others minutes
    // later; the team of two (with the split phase / without) at I=32 H=64 LSTM 0.76 / 0.84 and
    // 1.25-1.33 / 1.39-1.52 minutes later, GRU I=64 H=128 0.75 / 0.78, LSTM I=64 H=96 0.82 /
    // 0.86 (1.07 and 1.02 in other minutes), RNN H=64 1.35 / 1.68: the fork and join and each
    // step's exchange cost a round trip between the two vCPUs, 64 ns in some periods and
    // 550-900 in others (the host moves them within seconds). So by default (idle_projection()
    // and small_team() == -1) each layer direction chooses by measurement: the moving average
    // of its calls' time per row for each way (kept with its packed weights), another way tried
    // every FEW_EXPLORE-th call (one that measured r times the best's time only every r-th time
    // its turn comes: a trial then costs at most about one best call's time, whatever r).
    // (A step of fewer multiply-adds than DUO_MIN_MACS has too little to share: RNN I=32 H=64
    // B=1, 4096, ran 1.35-3.7 times as long on the team in every period.)
    constexpr int64_t IDLE_RING = 4, FEW_EXPLORE = 16;
    constexpr double DUO_MIN_MACS = 1.0e4;
    const int idle_mode = idle_projection(), duo_mode = small_team();
#ifdef _OPENMP
    const bool lone = few && nth1 == 1 && j.max_threads == 0 && !j.x_ready && threads_for_kernels() >= 2 &&
                      !omp_in_parallel();
#else
    const bool lone = false;
#endif
    const bool idle_fits = lone && idle_mode != 0 && TT > SB && (idle_mode == 1 || j.packed);
    const bool duo_fits = lone && duo_mode != 0 && j.infer && H > 2 * VL<T> && (!proj || P > 2 * VL<T>) &&
                          (double)B * G * H * P >= DUO_MIN_MACS && !amx_active() &&
                          (duo_mode == 1 || j.packed);
    const bool few_timed = !(duo_fits && duo_mode == 1) && !(idle_fits && idle_mode == 1) &&
                           ((idle_fits && idle_mode == -1) || (duo_fits && duo_mode == -1));
    int way = duo_fits && duo_mode == 1 ? 2 : idle_fits && idle_mode == 1 ? 1 : 0;
    if (few_timed) {
        PackSet& st = *j.packed;
        const int64_t c = st.few_calls++;
        int ways[3], nw = 0;   // the idle core's projection tried first, then one thread, then two
        if (idle_fits) ways[nw++] = 1;
        ways[nw++] = 0;
        if (duo_fits) ways[nw++] = 2;
        way = -1;
        for (int k = 0; k < nw && way < 0; ++k)
            if (st.few_ns[ways[k]] == 0) way = ways[k];   // each way measured once first
        if (way < 0) {
            int best = ways[0];
            for (int k = 1; k < nw; ++k)
                if (st.few_ns[ways[k]] < st.few_ns[best]) best = ways[k];
            way = best;
            if (c % FEW_EXPLORE == FEW_EXPLORE - 1) {   // the others in turn, one r times slower
                int others[2], no = 0;                    // tried every r-th turn (r up to 8)
                for (int k = 0; k < nw; ++k)
                    if (ways[k] != best) others[no++] = ways[k];
                const int o = others[(c / FEW_EXPLORE) % no];
                const int64_t r = std::min<int64_t>(8, st.few_ns[o] / st.few_ns[best]);
                if ((c / (FEW_EXPLORE * no)) % r == 0) way = o;
            }
        }
    }
    const bool idle = way == 1, duo = way == 2;
    const int nth = duo ? 2 : nth1;
    const int64_t few_t0 = few_timed ? PhaseClock::now() : 0;
    // the helper's shared state: packed (1) or given up (-1); blocks projected; the block the
    // recurrence is in (the ring's slots before it are free); where the recurrence put things
    struct alignas(64) IdleFlag { int64_t v = 0; };
    IdleFlag idle_packed, idle_made, idle_used;
    bool idle_ran = false;    // the helper came (a runtime may give the region fewer threads)
    bool duo_ran = false;     // the team of two came
    bool few_cold = false;    // a kept slot grew this call: not timed
    T* idle_pki = nullptr;
    T* idle_ring = nullptr;
    int64_t idle_nh = 0;
    run_team(idle ? 2 : nth, [&](int tid, int team_) {
        const bool helped = idle && team_ == 2;
        const int team = idle ? 1 : team_;   // the helper is no member of the recurrence's team
        if (tid == 0) {
            idle_ran = helped;
            duo_ran = duo && team_ == 2;
        }
        const int slot0 = duo && team_ == 2 ? 1 : 0;   // the team of two's kept slots: slot[1], slot[2]
        PhaseClock clock(tid);
        // the folded biases of the units [u0_, u0_ + n) added to a projected block's ns * B rows
        auto add_biases = [&](int64_t n, int64_t u0_, int64_t ns, T* gb, int64_t gs_, int64_t ldg_) {
            for (int64_t r = 0; r < ns * B && bias; ++r)
                for (int g = 0; g < G; ++g) add_row<T>(n, bias + g * H + u0_, gb + r * ldg_ + g * gs_);
        };
        if (helped && tid == 1) {   // blocks 1, 2, ... into the ring, as project() below would
            await_count(&idle_packed.v, 1);
            if (__atomic_load_n(&idle_packed.v, __ATOMIC_ACQUIRE) < 0) return;
            const int64_t hn = idle_nh;
            for (int64_t b = 1; b * SB < TT; ++b) {
                await_count(&idle_used.v, b - IDLE_RING + 1);   // its slot free
                const int64_t q = b * SB, ns = TT - q < SB ? TT - q : SB;
                const int64_t ta = rev ? TT - q - ns : q;
                T* gb = idle_ring + (b % IDLE_RING) * SB * B * G * hn;
                for (int g = 0; g < G; ++g)
                    gemm_pb<T>(ns * B, hn, I, j.x + ta * B * I, I, idle_pki + g * packed_b_size<T>(I, hn), T(0),
                               gb + g * hn, G * hn, false, 0, false, true);
                add_biases(hn, 0, ns, gb, hn, G * hn);
                __atomic_store_n(&idle_made.v, b + 1, __ATOMIC_RELEASE);
                clock.mark(PH_FWD_PROJ);
            }
            return;
        }
        sbar.join(team);
        if (tid == 0 && j.gate_team) *j.gate_team = blocked ? team : 0;
        StepBarrier::Local bsense(tid);
        // (the small layer's team of two splits at whole pairs of registers: the gate passes
        // take units two registers at a time and the last one or two by one, and where those
        // fall must not change with the team, or the sums could round differently)
        const int64_t ua = duo ? 2 * VL<T> : VL<T>;
        const Part U = part(H, team, tid, ua);
        const Part Q = proj ? part(P, team, tid, ua) : U;
        const int64_t nh = U.size(), nq = Q.size();
        const int64_t K1 = gru_orig ? H : P;
        const int64_t slice = packed_b_size<T>(K1, Gk * nh);   // elements of the packed W_hh slice
        // W_hh read in place (row-major, as on the unpacked path) at up to four batch rows
        // where the slice exceeds twice the L2: every step then streams it from the L3 either
        // way, and a packed copy costs its hash (one more read of W_hh a call, often from
        // memory: the peers' data evict it) or, when the weights changed (training), its
        // packing. Between 3/4 and 2 L2s the packed slice, most of it kept in the L2 by the
        // alternating sweeps, is faster (one process, alternating, ms, packed / in place: RNN
        // T=25 B=1 I=H=1024, 2 MiB, 1.00-1.05 / 1.21-1.28; LSTM T=100 B=1 I=768 H=512, 2 MiB,
        // 3.9-4.1 / 4.8-5.1; GRU I=768 H=512, 3.4 MiB, 8.4-8.8 / 8.9-9.0). Measured on
        // the AVX-512 Xeon (2 MiB of L2 a core), two threads, alternating processes, in place
        // against packed (ms): inference T=25 B=1 I=H=1024 LSTM 7.50-7.61 / 7.73-7.96, GRU
        // 5.02-5.18 / 5.37-5.59, B=4 LSTM 10.9-11.2 / 11.2-11.5; T=100 B=1 I=H=1024 GRU
        // 20.5-20.8 / 21.0-21.4, LSTM 29.9-30.0 / 29.5-30.3; training forward T=25 B=1 LSTM 8.0
        // / 8.3. Frozen copies and the C++ Model (address-checked, no hash) take the same path,
        // so that their results stay the layer's bit for bit, though for them the packed slice
        // was faster at the GRU (T=25 4.96-5.15 packed against 5.30-5.44 in place).
        //   Inference with the packed slice kept across calls (PackSet) reads it instead at two
        // to four batch rows, and at one from PACKED_HH_MIN_T steps on: the kept slice costs one
        // hash of W_hh a call and its stream is the faster one per step. Measured on a Zen 4 (two
        // cores, 1 MiB of L2 each, 32 MiB of L3), I=H=1024 unless given, in one process with the
        // choice switched between alternating rounds (in place -> packed, median of the rounds'
        // ratios): inference B=4 T=25 LSTM 0.78, GRU 0.84, B=4 T=8 LSTM 0.88, B=2 T=25 LSTM 0.84,
        // GRU 0.88; B=1 T=100 LSTM 0.85, GRU 0.92, T=50 H=768 LSTM 0.93, T=32 H=2048 LSTM 0.87;
        // B=1 T=25 LSTM 0.91-0.96, GRU 1.01-1.03, T=20 LSTM 1.02, T=12 1.13, T=8 1.29 (the hash
        // no longer paid back). Phases of B=4 T=25 LSTM (ms a thread): product 6.63 -> 4.48, hash
        // 0 -> 0.41. Training, whose weights change every call (a packing a call), keeps W_hh in
        // place: packed, B=1 T=25 LSTM 1.18, B=2 1.06, B=4 1.06, B=1 T=100 1.00.
        const bool packed_wins = j.infer && j.packed && (B > 1 || TT >= PACKED_HH_MIN_T);
        const bool inplace = !small && same_type<W, T>::value && B <= SMALL_B && !gru_orig && !proj &&
                             slice * (int64_t)sizeof(W) > 2 * l2_cache_bytes() && !packed_wins;
#ifdef RNNCORE_AMX_GEMM
        // The per-step product on the tile unit (cpu/amx.hpp): W_hh's slice kept in its three
        // bfloat16 parts (1.5 times the bytes), gate by gate, in up to three blocks of k (with the
        // split phase the thread's own rows of h, [kb1, kb2), and the rows before and after
        // them), each step's h split into its parts once a block for the Gk gates.
        const bool amx_hh = same_type<T, float>::value && same_type<W, T>::value && !small && !inplace &&
                            !gru_orig && !proj && amx_rows_enough(B, slice * (int64_t)sizeof(W)) && nh >= 32 &&
                            K1 >= 32 && amx_active();
#else
        const bool amx_hh = false;
#endif
        // Split-phase step barrier (see the product below): cells whose step has no barrier
        // but the last, on the packed path, with a W_hh slice that stays in the L2.
        const bool fits = split_fits(slice * (int64_t)sizeof(W) * (amx_hh ? 3 : 2) / 2);
        const bool split = !small && team > 1 && !gru_orig && !proj && fits && !duo;
#ifdef RNNCORE_AMX_GEMM
        const int64_t kb1 = split ? Q.lo : 0, kb2 = split ? Q.lo + nq : K1;
        const int64_t kbe[3] = {amx::packed_b_elems(kb2 - kb1, nh), amx::packed_b_elems(kb1, nh),
                                amx::packed_b_elems(K1 - kb2, nh)};   // bf16 a gate: own, before, after
        const int64_t npk_gate = amx_hh ? (kbe[0] + kbe[1] + kbe[2]) / (int64_t)(sizeof(T) / sizeof(amx::bf)) : 0;
#else
        const int64_t npk_gate = 0;
#endif
        const int64_t npk = small || inplace ? 0 : amx_hh ? Gk * npk_gate : slice;
        const int64_t npn = gru_orig && !small ? packed_b_size<T>(H, nh) : 0;
        const int64_t npr = proj && !small ? packed_b_size<T>(H, nq) : 0;
        // Packed slices kept across calls: valid when the hash of the layout and of the rows
        // this thread packs from matches the one stored with them.
#ifdef RNNCORE_AMX_GEMM
        // The fused blocks' input projection on the tile unit (cpu/amx.hpp): W_ih's slice kept in
        // its three bfloat16 parts, each block's rows of x split once for the G gates.
        const bool amx_ih = same_type<T, float>::value && ih_packed && fuse && nh >= 32 && I >= 32 &&
                            SB * B >= 32 && amx_active();
        constexpr int64_t bf_per_t = sizeof(T) / sizeof(amx::bf);   // (the packed sizes are multiples of 512)
        const int64_t npi1 = !ih_packed ? 0 : amx_ih ? amx::packed_b_elems(I, nh) / bf_per_t : packed_b_size<T>(I, nh);
        // a block's x rows, packed (the projection), or a step's h rows (the product)
        const int64_t nxa = std::max(amx_ih ? amx::packed_a_elems(SB * B, I) / bf_per_t : 0,
                                     amx_hh ? amx::packed_a_elems(B, K1) / bf_per_t : 0);
#else
        const bool amx_ih = false;
        const int64_t npi1 = ih_packed ? packed_b_size<T>(I, nh) : 0;   // W_ih slice, per gate
        const int64_t nxa = 0;
#endif
        // The thread's packed weights exceed its L2: they come from the L3 every step (gemm_pb)
        const bool stream = !small && !split_fits((wt(npk) + wt(npn) + wt(npr) + G * npi1) * (int64_t)sizeof(T));
        // The next block's projection spread over the block's steps, up to SPREAD_PER_STEP panels
        // of W_ih a step, beside the batch-1 product (product_with_piece): blocks in two slots, the
        // one in use and the next. The projection's FMAs then run while the product waits for W_hh
        // from the L2 instead of after it. One process, alternating rounds, spread / whole blocks
        // (T=100 B=1 I=128 H=256, Zen 4): two threads LSTM 0.92-0.95, GRU 0.93, RNN 0.95; one
        // thread LSTM 0.93, GRU 0.93; I=64 H=128 LSTM 0.965, GRU 0.97. The same sums as the whole
        // block's gemm_pb (row tiles): the results are the same bit for bit.
        const int64_t ppg = nh / NR<T>;   // panels a gate
        const int64_t per = ceil_div(G * ppg, SB > 0 ? SB : 1);   // panels a step
        const bool spread = spread_on && local_g && ih_packed && B == 1 && !idle && !amx_ih &&
                            same_type<W, T>::value && !small && !inplace && !amx_hh && !gru_orig && !proj &&
                            nh > 0 && nh % NR<T> == 0 && per <= SPREAD_PER_STEP && TT >= 2 * SB &&
                            !j.x_ready;   // (the layer pipeline: the next block's rows may not be there yet)
        constexpr int BUFN = 8;
        const int64_t sizes[BUFN] = {wt(npk), B * Gk * nh, wt(npn), gru_orig ? B * nh : 0, wt(npr), G * npi1,
                                     local_g ? (idle ? IDLE_RING : spread ? 2 : 1) * SB * B * G * nh : 0,
                                     std::max(nxa, !ih_packed && nh > 0 ? packed_b_size<T>(I, TT * B < XCH ? TT * B : XCH) : 0)};
        PackSlot* ps = j.packed && !small && tid + slot0 < MAX_TEAM ? &j.packed->slot[tid + slot0] : nullptr;
        bool fresh = false;
        uint64_t key = 0;
        if (ps) {
            const uint64_t layout[] = {(uint64_t)VB, sizeof(T), sizeof(W), (uint64_t)team, (uint64_t)tid,
                                       (uint64_t)j.cell, (uint64_t)gru_orig, (uint64_t)H,
                                       (uint64_t)P, (uint64_t)U.lo, (uint64_t)nh,
                                       (uint64_t)Q.lo, (uint64_t)nq, (uint64_t)fuse, (uint64_t)I,
                                       j.packed->trusted ? (uint64_t)(uintptr_t)j.w.w_hh : 0,
                                       j.packed->trusted ? (uint64_t)(uintptr_t)j.w.w_hr : 1,
                                       (uint64_t)ih_packed,
                                       ih_packed && j.packed->trusted ? (uint64_t)(uintptr_t)j.w.w_ih : 2,
                                       (uint64_t)inplace, (uint64_t)amx_ih, (uint64_t)amx_hh, (uint64_t)split};
            key = content_hash(layout, sizeof layout, 0x5EED);
            if (!j.packed->trusted) {
                for (int g = 0; g < Gk && !inplace; ++g)
                    key = content_hash(j.w.w_hh + (g * H + U.lo) * K1, nh * K1 * (int64_t)sizeof(T), key);
                if (gru_orig) key = content_hash(j.w.w_hh + (2 * H + U.lo) * H, nh * H * (int64_t)sizeof(T), key);
                if (proj) key = content_hash(j.w.w_hr + Q.lo * H, nq * H * (int64_t)sizeof(T), key);
                for (int g = 0; ih_packed && g < G; ++g)
                    key = content_hash(j.w.w_ih + (g * H + U.lo) * I, nh * I * (int64_t)sizeof(T), key);
            }
            // The slot holds the per-step scratch too (next to the packed weights, as per call).
            int64_t need = 0;
            for (int64_t n : sizes) need += round16(n);
            need *= (int64_t)sizeof(T);
            fresh = ps->valid && ps->hash == key && ps->bytes >= need;
            if (ps->bytes < need) __atomic_store_n(&few_cold, true, __ATOMIC_RELAXED);   // (a repacking is timed)
            if (!fresh) {
                ps->valid = false;
                if (ps->bytes < need) {
                    std::free(ps->data);
                    ps->data = aligned_buffer((size_t)need);
                    ps->bytes = ps->data ? need : 0;
                    if (!ps->data) raise_failure(&failed);
                }
            }
        }
        // h passed through the exchange pages: a team of two with the split phase, a step's
        // state within a page. Inference's ring of two slots lives there; training's states of
        // every step stay in j.hbuf for the backward, each step's written there too (its own
        // columns, by each thread) while the next step reads it from a page.
        const bool xwant = team == 2 && split && B * P * (int64_t)sizeof(T) <= ExchangeBlock::PAGE;
        // State slots (two with j.ring: kernels.hpp); the states entering the first step and
        // leaving the last.
        auto slot = [&](int64_t sl) { return j.ring ? sl & 1 : sl; };
        const int64_t enter = rev ? TT : 0, leave = rev ? 0 : TT;
        // both slots in the fastest page where they fit, else one in each of the two fastest
        const int64_t xsb = (B * P * (int64_t)sizeof(T) + 63) / 64 * 64;
        auto xslot = [&](int64_t sl) {
            return reinterpret_cast<T*>(2 * xsb <= ExchangeBlock::PAGE ? exchange_page(0) + (sl & 1) * xsb
                                                                        : exchange_page((int)(sl & 1)));
        };
        if (xwant && tid == 0) {
            xrole = exchange_claim();
            if (xrole == 2) std::memcpy(xslot(enter), j.hbuf + slot(enter) * B * P, sizeof(T) * B * P);
        }
        T* buf[BUFN];
        T* mem = nullptr;                                 // per-call scratch (no kept slot)
        auto give_up = [&] {
            if (tid == 0 && xrole == 2) exchange_release();
            if (helped) __atomic_store_n(&idle_packed.v, -1, __ATOMIC_RELEASE);   // the helper leaves
        };
        if (!ps) {
            mem = team_carve<T>(sizes, buf, &failed, team);
            if (!mem) return give_up();
        } else if (team_failed(&failed, team)) {
            return give_up();
        } else {    // packed parts first, so their offsets do not depend on the batch
            T* p = static_cast<T*>(ps->data);
            for (int i : {0, 2, 4, 5, 1, 3, 6, 7}) {
                buf[i] = sizes[i] > 0 ? p : nullptr;
                p += round16(sizes[i]);
            }
        }
        W* pk = reinterpret_cast<W*>(buf[0]);
        W* pkn = reinterpret_cast<W*>(buf[2]);
        W* pkr = reinterpret_cast<W*>(buf[4]);
        T *hh = buf[1], *hnv = buf[3], *pki = buf[5];
        T* gblk = buf[6];
        T* const gbase = buf[6];
        T* xp = buf[7];                                   // the input rows, packed (gemm_xwt)
        if (xwant && xrole == 1) exchange_measure(tid);   // (after the barrier above)
        const bool xuse = xwant && xrole == 2;
        T* const hslot[2] = {xuse ? xslot(0) : nullptr, xuse ? xslot(1) : nullptr};
        int64_t ta_blk = 0;                               // first time index of the block
        // Pre-activations: gate stride and row stride, and the row of batch row b at step t.
        const bool blockwise = local_g || blocked;
        const int64_t gs = blockwise ? nh : H, ldg = blockwise ? G * nh : GH;
        auto grow = [&](int64_t t, int64_t b) {
            return blockwise ? gblk + ((t - ta_blk) * B + b) * ldg : j.gates + (t * B + b) * GH + U.lo;
        };
        const int64_t u0 = U.lo;
        if (!fresh) {
            for (int g = 0; ih_packed && nh > 0 && g < G; ++g) {
#ifdef RNNCORE_AMX_GEMM
                if constexpr (same_type<T, float>::value) {
                    if (amx_ih) {
                        amx::pack_all_b(true, I, nh, j.w.w_ih + (g * H + u0) * I, I, reinterpret_cast<amx::bf*>(pki + g * npi1));
                        continue;
                    }
                }
#endif
                pack_b_rows<T>(I, nh, j.w.w_ih, I, [&](int64_t n) { return g * H + u0 + n; },
                               pki + g * npi1);
            }
#ifdef RNNCORE_AMX_GEMM
            if constexpr (same_type<T, float>::value && same_type<W, T>::value) {
                for (int g = 0; amx_hh && g < Gk; ++g) {
                    amx::bf* d = reinterpret_cast<amx::bf*>(pk + g * npk_gate);
                    const float* wg = j.w.w_hh + (g * H + u0) * K1;
                    amx::pack_all_b(true, kb2 - kb1, nh, wg + kb1, K1, d);
                    if (kb1 > 0) amx::pack_all_b(true, kb1, nh, wg, K1, d + kbe[0]);
                    if (K1 > kb2) amx::pack_all_b(true, K1 - kb2, nh, wg + kb2, K1, d + kbe[0] + kbe[1]);
                }
            }
#endif
            if (nh > 0 && !small && !inplace && !amx_hh) {
                pack_b_rows<T>(K1, Gk * nh, j.w.w_hh, K1,
                               [&](int64_t n) { return (n / nh) * H + u0 + n % nh; }, pk);
                if (gru_orig)
                    pack_b_rows<T>(H, nh, j.w.w_hh, H, [&](int64_t n) { return 2 * H + u0 + n; }, pkn);
            }
            if (proj && nq > 0 && !small)
                pack_b_rows<T>(H, nq, j.w.w_hr, H, [&](int64_t n) { return Q.lo + n; }, pkr);
            if (ps) {
                ps->hash = key;
                ps->valid = true;
#ifdef _OPENMP
#pragma omp atomic
#endif
                j.packed->packs += 1;
            }
        }
        clock.mark(PH_FWD_PACK);   // the kept slot's check, and its packing if stale
        if (helped) {   // W_ih packed: the helper may start
            idle_pki = pki;
            idle_ring = gblk;
            idle_nh = nh;
            __atomic_store_n(&idle_packed.v, 1, __ATOMIC_RELEASE);
        }
        const T* pi = lstm && j.peephole ? j.w.w_peep : nullptr;
        const T* bhn = gru && j.lbr && j.w.b_hh ? j.w.b_hh + 2 * H + u0 : nullptr;
        // The unpacked path's input projection: this thread's gate columns of every step, from
        // its rows of W_ih in place (only it reads them: no barrier).
        if (small && nh > 0) {
            await_input(j, TT);
            gemm_xwt<T>(TT * B, nh, I, j.x, I, G, j.w.w_ih + u0 * I, H, I, bias ? bias + u0 : nullptr, H,
                        j.gates + u0, H, GH, xp);
        }

        // The projection of a block: before the step's product with the split phase (where it
        // leaves the other threads time to arrive), else after it, just before the gate pass
        // that reads its rows: projected before the product, they were evicted from the L2 by
        // the W_hh slice that the product streams through it. Two threads, alternating in one
        // process (ms, before / after): inference T=100 B=64 I=256 H=512 LSTM 68.7 / 65.9, GRU
        // 52.7 / 52.4, RNN 17.5 / 17.7; T=50 B=32 I=H=1024 LSTM 83.8 / 82.8, GRU 59.9 / 59.8;
        // training B=64 LSTM 197.0 / 194.4, GRU 156.1 / 155.8; with the split phase (T=100 B=16
        // I=128 H=256) no difference.
        const bool late = !split;
        auto project = [&](int64_t q) {
            if (fuse && nh > 0 && q % SB == 0) {   // this thread's gate columns, SB steps ahead
                const int64_t ns = TT - q < SB ? TT - q : SB;
                const int64_t ta = rev ? TT - q - ns : q;     // first time index of the block
                ta_blk = ta;
                if (spread) {   // the block's slot; from the second on, full ones came in pieces
                    gblk = gbase + ((q / SB) & 1) * SB * B * G * nh;
                    if (q > 0 && ns == SB) return;
                }
                if (helped) {   // the block's slot of the ring: the idle core projects all but the first
                    const int64_t b = q / SB;
                    __atomic_store_n(&idle_used.v, b, __ATOMIC_RELEASE);
                    gblk = idle_ring + (b % IDLE_RING) * SB * B * G * nh;
                    if (b > 0) {
                        await_count(&idle_made.v, b + 1);
                        return;
                    }
                }
                await_input(j, ta + ns);   // the layer below has written the block's rows
                if (blocked) gblk = j.gates + gate_offset(TT, B, GH, G, SB, rev, ta, 0, u0, nh);
                T* gb = grow(ta, 0);
                if (ih_packed) {
                    for (int g = 0; g < G; ++g) {
#ifdef RNNCORE_AMX_GEMM
                        if constexpr (same_type<T, float>::value) {
                            if (amx_ih) {
                                amx::gemm_packed_b(ns * B, nh, I, j.x + ta * B * I, I,
                                                   reinterpret_cast<const amx::bf*>(pki + g * npi1), gb + g * gs, ldg,
                                                   reinterpret_cast<amx::bf*>(xp), g > 0);
                                continue;
                            }
                        }
#endif
                        gemm_pb<T>(ns * B, nh, I, j.x + ta * B * I, I, pki + g * npi1, T(0), gb + g * gs, ldg,
                                   false, 0, stream, true);
                    }
                    add_biases(nh, u0, ns, gb, gs, ldg);
                } else {
                    gemm_xwt<T>(ns * B, nh, I, j.x + ta * B * I, I, G, j.w.w_ih + u0 * I, H, I,
                                bias ? bias + u0 : nullptr, H, gb, gs, ldg, xp);
                }
            }
        };
        // Per-step rows: one with j.ring.
        auto srow = [&](int64_t t) { return j.ring ? int64_t(0) : t; };
        for (int64_t q = 0; q < TT; ++q) {
            const int64_t t = rev ? TT - 1 - q : q;
            if (!late) project(q);
            clock.mark(PH_FWD_PROJ);
            const T* hprev = xuse ? hslot[(t + rev) & 1] : j.hbuf + slot(t + rev) * B * P;
            T* hnext = xuse ? hslot[(t + 1 - rev) & 1] : j.hbuf + slot(t + 1 - rev) * B * P;
            const T* cprev = j.cbuf ? j.cbuf + slot(t + rev) * B * H : nullptr;
            T* cnext = j.cbuf ? j.cbuf + slot(t + 1 - rev) * B * H : nullptr;
            T* ext = j.extra ? j.extra + srow(t) * B * H : nullptr;   // this step's rows
            T* mrow = j.mbuf ? j.mbuf + srow(t) * B * H : nullptr;
            T* yt = j.y + t * B * j.ldy;
            const bool zero_h = q == 0 && j.zero_start;   // h @ W_hh^T = 0
            // this step's piece of the next block (spread): panel q % SB of W_ih's G * ppg
            Piece<T> piece_at{};
            const Piece<T>* piece = nullptr;
            bool piece_done = false;
            if (spread && q % SB * per < G * ppg && (q / SB + 2) * SB <= TT) {
                // (W_ih's packed panels and the block's columns run gate after gate: panel p at
                // pki + p I NR, its columns at p NR)
                const int64_t p0 = q % SB * per, qn = (q / SB + 1) * SB, tn = rev ? TT - qn - SB : qn;
                piece_at = {j.x + tn * B * I, I, I, SB * B, pki + p0 * I * NR<T>, std::min(per, G * ppg - p0),
                            gbase + ((q / SB + 1) & 1) * SB * B * G * nh + p0 * NR<T>, G * nh};
                piece = &piece_at;
            }
            if (nh > 0 && zero_h) {
                std::memset(hh, 0, sizeof(T) * B * Gk * nh);
            } else if (nh > 0 && small) {
                for (int g = 0; g < Gk; ++g)
                    small_nt<T>(B, nh, K1, j.w.w_hh + (g * H + u0) * K1, K1, hprev, P, hh + g * nh, Gk * nh);
            } else if (nh > 0 && inplace) {   // alternating directions, as the packed sweep
                snake_chunks(Gk, nh, INPLACE_ROWS, q & 1, [&](int g, int64_t r0, int64_t nr, int64_t) {
                    if (B == 1) gemv_stream<T>(nr, K1, j.w.w_hh + (g * H + u0 + r0) * K1, K1, hprev, hh + g * nh + r0);
                    else small_nt<T>(B, nr, K1, j.w.w_hh + (g * H + u0 + r0) * K1, K1, hprev, P, hh + g * nh + r0, Gk * nh);
                });
            } else if (nh > 0 && amx_hh) {
#ifdef RNNCORE_AMX_GEMM
                if constexpr (same_type<T, float>::value && same_type<W, T>::value) {
                    // the own rows of h first; with the split phase the others' after they arrive
                    auto block = [&](int64_t off, int64_t k0, int64_t kk, bool acc) {   // off: in the gate's parts
                        for (int g = 0; g < Gk && kk > 0; ++g)
                            amx::gemm_packed_b(B, nh, kk, hprev + k0, P,
                                               reinterpret_cast<const amx::bf*>(pk + g * npk_gate) + off,
                                               hh + g * nh, Gk * nh, reinterpret_cast<amx::bf*>(xp), g > 0, acc);
                    };
                    block(0, kb1, kb2 - kb1, false);
                    if (split && q > 0) sbar.await(bsense);
                    block(kbe[0], 0, kb1, true);
                    block(kbe[0] + kbe[1], kb2, K1 - kb2, true);
                }
#endif
            } else if (nh > 0 && piece && split && q > 0) {
                // the split-phase product (below) with the piece beside it: half its tiles before
                // the wait, the rest beside the first part after it (none beside a later part)
                const int64_t nt = piece->tiles();
                int64_t t0 = 0, t1 = nt / 2;
                split_product<T>(B, Gk * nh, 1, P, Q.lo, nq, hprev, hprev, P, P, pk, hh, Gk * nh, q & 1,
                                 [&] { sbar.await(bsense); t1 = nt; },
                                 [&](int64_t kk, const T* a, const W* bp, T beta) {
                                     product_with_piece<T, W>(Gk * nh, kk, a, bp, beta, hh, Gk * nh, q & 1, K1,
                                                              *piece, t0, t1);
                                     t0 = t1;
                                 });
                piece_done = true;
            } else if (nh > 0 && piece) {
                product_with_piece<T, W>(Gk * nh, K1, hprev, pk, T(0), hh, Gk * nh, q & 1, 0, *piece, 0, piece->tiles());
                piece_done = true;
            } else if (nh > 0 && split && q > 0) {
                // The previous step's barrier was only arrived at: first the part of the
                // product over this thread's own slice of h (written by itself), then, once the
                // others have arrived, the rest. The wait overlaps the first part.
                split_product<T>(B, Gk * nh, 1, P, Q.lo, nq, hprev, hprev, P, P, pk, hh, Gk * nh, q & 1,
                                 [&] { sbar.await(bsense); });
            } else if (nh > 0) {
                gemm_pb<T>(B, Gk * nh, K1, hprev, P, pk, T(0), hh, Gk * nh, q & 1, 0, stream);
            } else if (split && q > 0) {
                sbar.await(bsense);
            }
            if (piece) {   // (a step without the product: on its own) and the piece's biases
                if (!piece_done)
                    gemm_pb<T>(piece->rows, piece->panels * NR<T>, I, piece->x, I, piece->w, T(0), piece->out, piece->ldo,
                               false, 0, false, true);   // (row tiles, as every block's projection)
                for (int64_t pp = 0; pp < piece->panels && bias; ++pp) {
                    const int64_t p = q % SB * per + pp, c0 = p / ppg * H + u0 + p % ppg * NR<T>;
                    for (int64_t r = 0; r < piece->rows; ++r)
                        add_row<T>(NR<T>, bias + c0, piece->out + r * piece->ldo + pp * NR<T>);
                }
            }
            clock.mark(PH_FWD_PRODUCT);   // with the split phase, its wait for the others
            if (late) { project(q); clock.mark(PH_FWD_PROJ); }
            for (int64_t b = 0; b < B && nh > 0; ++b) {
                T* g = grow(t, b);
                const T* hb = hh + b * Gk * nh;
                const bool act = active(j.lengths, b, t);
                if (lstm) {
                    const T* cp = cprev + b * H + u0;
                    T* cn = cnext + b * H + u0;
                    T* m = proj ? mrow + b * H + u0 : hnext + b * P + u0;
                    if (!act) {
                        std::memcpy(cn, cp, sizeof(T) * nh);
                        if (proj) std::memset(m, 0, sizeof(T) * nh);
                        continue;
                    }
                    lstm_fwd_row<T>(nh, g, g + gs, g + 2 * gs, g + 3 * gs, hb, hb + nh, hb + 2 * nh,
                                    hb + 3 * nh, cp, cn, m, pi ? pi + u0 : nullptr,
                                    pi ? pi + H + u0 : nullptr, pi ? pi + 2 * H + u0 : nullptr,
                                    j.coupled);
                } else if (gru) {
                    T* ex = ext + b * H + u0;
                    if (!act) {
                        if (gru_orig) std::memset(ex, 0, sizeof(T) * nh);
                        continue;
                    }
                    if (gru_orig)
                        gru_orig_rz_row<T>(nh, g, g + gs, hb, hb + nh, hprev + b * P + u0, ex);
                    else
                        gru_fwd_row<T>(nh, g, g + gs, g + 2 * gs, hb, hb + nh, hb + 2 * nh, bhn,
                                       hprev + b * P + u0, ex, hnext + b * P + u0);
                } else if (act) {
                    rnn_fwd_row<T>(nh, g, hb, hnext + b * P + u0, relu);
                }
            }
            if (gru_orig) {
                sbar.wait(bsense);   // r * h complete
                if (nh > 0 && zero_h)
                    std::memset(hnv, 0, sizeof(T) * B * nh);
                else if (nh > 0 && small)
                    small_nt<T>(B, nh, H, j.w.w_hh + (2 * H + u0) * H, H, ext, H, hnv, nh);
                else if (nh > 0)
                    gemm_pb<T>(B, nh, H, ext, H, pkn, T(0), hnv, nh, false, 0, stream);
                for (int64_t b = 0; b < B && nh > 0; ++b) {
                    if (!active(j.lengths, b, t)) continue;
                    T* g = grow(t, b);
                    gru_orig_n_row<T>(nh, g + gs, g + 2 * gs, hnv + b * nh, hprev + b * P + u0,
                                      hnext + b * P + u0);
                }
            }
            if (proj) {
                sbar.wait(bsense);   // o * tanh(c) complete
                if (nq > 0 && small)
                    small_nt<T>(B, nq, H, j.w.w_hr + Q.lo * H, H, mrow, H, hnext + Q.lo, P);
                else if (nq > 0)
                    gemm_pb<T>(B, nq, H, mrow, H, pkr, T(0), hnext + Q.lo, P, false, 0, stream);
            }
            // Inactive rows carry their state; every row writes its output slice.
            for (int64_t b = 0; b < B && nq > 0; ++b) {
                T* hn = hnext + b * P + Q.lo;
                T* yb = yt + b * j.ldy + Q.lo;
                if (!active(j.lengths, b, t)) {
                    std::memcpy(hn, hprev + b * P + Q.lo, sizeof(T) * nq);
                    std::memset(yb, 0, sizeof(T) * nq);
                } else if (j.ymask) {
                    const T* mk = j.ymask + (t * B + b) * j.ldy + Q.lo;
                    for (int64_t k = 0; k < nq; ++k) yb[k] = hn[k] * mk[k];
                } else {
                    std::memcpy(yb, hn, sizeof(T) * nq);
                }
                if (xuse && !j.ring)   // training's record of the step's state
                    std::memcpy(j.hbuf + (t + 1 - rev) * B * P + b * P + Q.lo, hn, sizeof(T) * nq);
            }
            if (j.y_ready && team == 1 && !rev)   // the layer above may project this step
                __atomic_store_n(j.y_ready, q + 1, __ATOMIC_RELEASE);
            // the new state is complete before the next step reads it (with split, the next
            // step awaits the others after the product over its own slice)
            clock.mark(PH_FWD_CELL);   // (Cho's GRU and projections: their second product too)
            if (split) sbar.arrive(bsense);
            else sbar.wait(bsense);
            clock.mark(PH_FWD_SYNC);
        }
        if (split && TT > 0) sbar.await(bsense);
        if (xuse && tid == 0) {   // every thread has arrived after its last step
            if (j.ring) std::memcpy(j.hbuf + slot(leave) * B * P, hslot[leave & 1], sizeof(T) * B * P);
            exchange_release();
        }
        clock.mark(PH_FWD_SYNC);
        if (spread) note_spread_projection();
        scratch_free(mem);
    });
    if (few_timed && !failed && !few_cold) {   // the moving average of this way's time per row (x16)
        PackSet& st = *j.packed;
        const int64_t s = (PhaseClock::now() - few_t0) * 16 / (TT * B > 0 ? TT * B : 1) + 1;
        int64_t& avg = st.few_ns[idle_ran ? 1 : duo_ran ? 2 : 0];
        avg = avg == 0 ? s : avg + (s - avg) / 8;
    }
    if (idle_ran && !failed) note_idle_projection();
    if (duo_ran && !failed) note_small_team();
    scratch_free(bias);
    if (failed) throw std::bad_alloc();
    if (j.y_ready) __atomic_store_n(j.y_ready, TT, __ATOMIC_RELEASE);
}

template <class T> void dir_forward(const DirJob<T>& j) {
    if constexpr (same_type<T, float>::value) {
        if (j.bf16 && j.infer) return dir_forward_w<T, bf16>(j);
    }
    dir_forward_w<T, T>(j);
}

// ------------------------------------------------------------------ backward
// The gates blocked by a team of gteam (gate_offset) back to row-major, in place.
template <class T> void unblock_gates(const DirJob<T>& j, int gteam) {
    const int64_t TT = j.steps, B = j.batch, H = j.hid;
    RNNCORE_CELL_DIMS(j.cell, H, j.out, j.lbr);
    const int64_t SB = fuse_steps(B);
    T* tmp = alloc<T>(TT * B * GH);
    for (int tid = 0; tid < gteam; ++tid) {
        const Part U = part(H, gteam, tid, VL<T>);
        for (int64_t t = 0; t < TT; ++t)
            for (int64_t b = 0; b < B; ++b) {
                const T* src = j.gates + gate_offset(TT, B, GH, G, SB, j.reverse, t, b, U.lo, U.size());
                for (int g = 0; g < G; ++g)
                    std::memcpy(tmp + (t * B + b) * GH + g * H + U.lo, src + g * U.size(),
                                sizeof(T) * U.size());
            }
    }
    std::memcpy(j.gates, tmp, sizeof(T) * TT * B * GH);
    std::free(tmp);
}

// The backward gate pass of batch row b at step t for the units [u0, u0 + nh) (Cho's GRU: its
// z and n gates; r comes after the step's second product): g at the row's gate activations
// of the units (gate stride gs), dm at dL/dh of the units (the LSTM with a projection: of
// o * tanh(c)), da / dah at the row's dgx / dgh (unit 0), dhd at the GRU's direct path dh * z
// of the units, bs the units' bias sums [G, nh] (or null), bsn the reset-after GRU's
// hidden-side n bias sum. A row past its sequence's end gets zero gate gradients.
template <class T>
inline void bwd_gate_row(const DirBackJob<T>& bj, int64_t ghx, int64_t t, int64_t b, int64_t u0, int64_t nh,
                         const T* g, int64_t gs, const T* dm, T* da, T* dah, T* dhd, T* bs, T* bsn) {
    const DirJob<T>& j = bj.f;
    const int64_t B = j.batch, H = j.hid, P = j.out;
    RNNCORE_CELL_DIMS(j.cell, H, P, j.lbr);
    const int rev = j.reverse ? 1 : 0;
    da += u0;
    dah += u0;
    if (!active(j.lengths, b, t)) {
        for (int q = 0; q < G; ++q) {
            std::memset(da + q * H, 0, sizeof(T) * nh);
            if (dah != da && q * H >= ghx) std::memset(dah + q * H, 0, sizeof(T) * nh);
        }
        return;
    }
    if (lstm) {
        const T* pi = j.peephole ? j.w.w_peep + u0 : nullptr;
        lstm_bwd_row<T>(nh, g, g + gs, g + 2 * gs, g + 3 * gs, dm, j.cbuf + (t + rev) * B * H + b * H + u0,
                        j.cbuf + (t + 1 - rev) * B * H + b * H + u0, bj.dc + b * H + u0, pi,
                        pi ? pi + H : nullptr, pi ? pi + 2 * H : nullptr, j.coupled, da, da + H,
                        da + 2 * H, da + 3 * H, bs);
    } else if (gru) {
        gru_bwd_row<T>(nh, g, g + gs, g + 2 * gs, j.extra + (t * B + b) * H + u0,
                       j.hbuf + (t + rev) * B * P + b * P + u0, dm, j.lbr, da, da + H, da + 2 * H,
                       dah + 2 * H, dhd, bs, bsn);
    } else {
        rnn_bwd_row<T>(nh, j.hbuf + (t + 1 - rev) * B * P + b * P + u0, dm, da, relu, bs);
    }
}

// dW_ih and dW_hh (+=) from the rows [r0, r0 + nr) of dG (steps x batch) and its gate rows
// [m0, m1): one pass over dG^T for both where they share it; the reset-after GRU's dW_hh takes
// its n rows from dgh (gemm_parts' A2). Not Cho's GRU.
template <class T>
void weight_grads(const DirBackJob<T>& bj, int64_t ghx, int64_t LD, const T* dgh, int64_t r0, int64_t nr,
                  int64_t m0, int64_t m1) {
    const DirJob<T>& j = bj.f;
    const int64_t I = j.in, P = j.out;
    const T* Hprev = j.hbuf + (j.reverse ? j.batch * P : 0) + r0 * P;   // states entering the rows' steps
    const T* A = bj.dgx + r0 * LD + m0;
    const int64_t mh = m1 - m0;
    if (mh <= 0) return;
    if (dgh == bj.dgx) {
        const GemmPart<T> wg[2] = {{j.x + r0 * I, I, bj.g.w_ih + m0 * I, I, I},
                                   {Hprev, P, bj.g.w_hh + m0 * P, P, P}};
        gemm_parts<T>(true, false, mh, nr, T(1), A, LD, wg, 2, T(1));
    } else {
        gemm<T>(true, false, mh, I, nr, T(1), A, LD, j.x + r0 * I, I, T(1), bj.g.w_ih + m0 * I, I);
        const GemmPart<T> wh{Hprev, P, bj.g.w_hh + m0 * P, P, P};
        gemm_parts<T>(true, false, mh, nr, T(1), A, LD, &wh, 1, T(1), dgh + r0 * LD + m0, ghx - m0);
    }
}

// The backward's dh of the previous step on the rows active at step t: the product's rows
// (tmp, n columns), plus the GRU's direct path dh * z (dhd) where given.
template <class T>
void dh_rows(int64_t B, int64_t n, const int64_t* lengths, int64_t t, const T* tmp, int64_t ldt,
             const T* dhd, int64_t ldd, T* dh, int64_t ldh) {
    for (int64_t b = 0; b < B; ++b) {
        if (!active(lengths, b, t)) continue;
        T* dhb = dh + b * ldh;
        const T* tb = tmp + b * ldt;
        if (dhd) {
            const T* d2 = dhd + b * ldd;
            for (int64_t k = 0; k < n; ++k) dhb[k] = tb[k] + d2[k];
        } else {
            std::memcpy(dhb, tb, sizeof(T) * n);
        }
    }
}

// The peephole weights' gradients (LSTM), from the complete dgx.
template <class T> void peephole_grads(const DirBackJob<T>& bj) {
    const DirJob<T>& j = bj.f;
    const int64_t TT = j.steps, B = j.batch, H = j.hid;
    const int64_t LD = bj.ldg ? bj.ldg : 4 * H;
    const int rev = j.reverse ? 1 : 0;
    T* gp = bj.g.w_peep;
    for (int64_t t = 0; t < TT; ++t) {
        const T* cprev = j.cbuf + (t + rev) * B * H;
        const T* cnext = j.cbuf + (t + 1 - rev) * B * H;
        for (int64_t b = 0; b < B; ++b) {
            const T* da = bj.dgx + (t * B + b) * LD;
            for (int64_t k = 0; k < H; ++k) {
                gp[k] += da[k] * cprev[b * H + k];
                gp[H + k] += da[H + k] * cprev[b * H + k];
                gp[2 * H + k] += da[3 * H + k] * cnext[b * H + k];
            }
        }
    }
}

// ------------------------------------------------------------------ pipelined backward
// A layer whose whole packed W_hh fits one core's L2 (LSTM H=256: 1 MiB) has a per-step product
// too small to share well: split over two threads, each step exchanges the fresh gate
// gradients between the cores, and the dh product ran at 78% of the forward's rate (LSTM T=100
// B=16 H=256: 2.9 against 2.3 ms). Pipelined instead: thread 0 walks the recurrence alone (its
// W_hh whole in its L2, no exchange, no barrier), while thread 1 computes the weight and input
// gradients of the blocks of steps it has finished (dG^T [X | H] and dG @ W_ih, PIPE_ROWS rows
// a block); when the recurrence is done, thread 0 joins in on the blocks left. A block's work
// goes in two pieces, the halves of the gate rows of dW (and of the block's rows of dx), so
// that two threads can share the blocks without private copies of dW: a piece waits for the
// last piece of its half to be finished (they accumulate into the same rows). From PIPE_WIDE_B
// batch rows a W_hh of up to twice the L2 is pipelined too: thread 0 then reads part of it
// from the L3 every step, with enough rows a step to keep its product at the GEMM's rate
// (dir_backward has the measurements).
// Rows (steps x batch) of a block, at most. A piece's GEMM reads and writes its half of dW
// once per block, for `rows` multiply-adds per element: 256 rows against 128, training, two
// threads, one process, alternating (benchmarks/ab.py, new/old, 7-9 rounds): RNN T=100 B=64
// I=256 H=512 0.975-0.978 (its weight-gradient pieces 0.937), B=16 I=128 H=256 0.973, LSTM
// B=64 I=128 H=256 0.975, B=16 0.986-1.012, B=32 I=H=256 0.991, GRU B=16 I=128 H=256 0.983, B=32
// I=H=256 1.004-1.015; 512 rows: RNN B=64 0.981, LSTM B=16 1.009. (Up to B=8 the blocks of a
// 100-step sequence stay T/8 steps.)
constexpr int64_t PIPE_ROWS = 256;
constexpr int64_t PIPE_BLOCKS = 8;   // blocks at least, where the rows allow
constexpr int64_t PIPE_WIDE_B = 64;  // batch rows from which a W_hh of up to twice the L2 pipelines (dir_backward)
inline int64_t pipe_steps(int64_t TT, int64_t B) {   // steps of a block
    const int64_t s = ceil_div(PIPE_ROWS, B), f = ceil_div(TT, PIPE_BLOCKS);
    return s < f ? s : f;
}

template <class T>
void pipe_backward(const DirBackJob<T>& bj, int gteam, int64_t ghx, int64_t Kc, int64_t LD, T* dgh) {
    const DirJob<T>& j = bj.f;
    const int64_t TT = j.steps, B = j.batch, I = j.in, H = j.hid, P = j.out;   // P == H (no projection)
    RNNCORE_CELL_DIMS(j.cell, H, P, j.lbr);
    const int rev = j.reverse ? 1 : 0;
    const int64_t SB = fuse_steps(B), S = pipe_steps(TT, B);
    // Blocks of S steps, after a ramp of S/4, S/4 and S/2: thread 1 waits for the first block
    // (LSTM T=100 B=16 H=256: 8 steps of the recurrence, ~0.45 ms, idle).
    const int64_t s0 = S >= 4 ? S / 4 : 1, s2 = S >= 2 ? S / 2 : 1;
    auto bstart = [&](int64_t k) {   // steps of the recurrence before block k
        const int64_t c = k <= 2 ? k * s0 : 2 * s0 + s2 + (k - 3) * S;
        return c < TT ? c : TT;
    };
    int64_t nblk = 0;
    while (bstart(nblk) < TT) ++nblk;
    const int nparts = gteam > 0 ? gteam : 1;          // the forward's team: its gate layout
    const bool two_bias = bj.g.b_ih && dgh != bj.dgx;
    // the pieces' split of the gate rows (whole row tiles; all in the first where GH < 2 MR)
    const int64_t mhalf = ceil_div(GH, 2 * MR) * MR < GH ? ceil_div(GH, 2 * MR) * MR : GH;
    // block k: the recurrence's positions [qlo, qhi), time rows [r0, r0 + nr)
    auto block = [&](int64_t k, int64_t& qlo, int64_t& r0, int64_t& nr) {
        const int64_t qhi = TT - bstart(k);
        qlo = TT - bstart(k + 1);
        r0 = (rev ? TT - qhi : qlo) * B;
        nr = (qhi - qlo) * B;
    };
#ifdef RNNCORE_AMX_GEMM
    // the dh product on the tile unit (W_hh packed in its parts, a step's dG split once)
    const bool amx_dhp = same_type<T, float>::value && amx_dh_takes(B, P, Kc, ghx, packed_b_size<T>(Kc, P) * (int64_t)sizeof(T));
    const int64_t npk = amx_dhp ? amx_dh_elems(Kc, ghx, P) : packed_b_size<T>(Kc, P);
    const int64_t nap = amx_dhp ? amx_dh_a_elems(B, Kc, ghx) : 0;
#else
    const bool amx_dhp = false;
    const int64_t npk = packed_b_size<T>(Kc, P), nap = 0;
#endif
    const int64_t sizes[7] = {npk, bj.dx ? packed_b_size<T>(GH, I) : 0, B * P, gru ? B * H : 0,
                              bj.g.b_ih ? G * H : 0, two_bias ? G * H : 0, nap};
    T* buf[7];
    int carve_failed = 0;
    T* mem = team_carve<T>(sizes, buf, &carve_failed, 1);   // (outside the region: a team of one)
    if (!mem) throw std::bad_alloc();
    T *pk = buf[0], *pki = buf[1], *tmp = buf[2], *dhd = buf[3], *bsum = buf[4];
    T* bsumh = two_bias ? buf[5] : buf[4];
    if (bsum) std::memset(bsum, 0, sizeof(T) * G * H);
    if (two_bias) std::memset(bsumh, 0, sizeof(T) * G * H);
    // Counters on lines of their own: steps finished by the recurrence, pieces claimed, W_ih
    // packed, pieces finished per half; a piece whose GEMM failed to allocate.
    struct alignas(64) Flag { int64_t v; };
    Flag done{}, next{}, pki_ready{}, fin[2]{}, failed{};
    const T dx_beta = bj.dx_accumulate ? T(1) : T(0);
    // piece (k, h): half h of block k's gate rows of dW_ih and dW_hh, and half of its rows of dx
    auto piece = [&](int64_t k, int h, PhaseClock& clock) {
        int64_t qlo, r0, nr;
        block(k, qlo, r0, nr);
        weight_grads<T>(bj, ghx, LD, dgh, r0, nr, h == 0 ? 0 : mhalf, h == 0 ? mhalf : GH);
        clock.mark(PH_BWD_WEIGHTS);
        const int64_t x0 = r0 + nr * h / 2, x1 = r0 + nr * (h + 1) / 2;
        if (x1 > x0 && bj.dx) gemm_pb<T>(x1 - x0, I, GH, bj.dgx + x0 * LD, LD, pki, dx_beta, bj.dx + x0 * I, I);
        clock.mark(PH_BWD_INPUT);
    };
    auto pieces = [&](int tid) {   // claim pieces in order until none is left
        PhaseClock clock(tid);
        for (;;) {
            const int64_t p = __atomic_fetch_add(&next.v, 1, __ATOMIC_RELAXED);
            if (p >= 2 * nblk) break;
            const int64_t k = p / 2;
            const int h = (int)(p % 2);
            int64_t qlo, r0, nr;
            block(k, qlo, r0, nr);
            await_count(&done.v, TT - qlo);   // the block's gate gradients complete
            await_count(&fin[h].v, k);        // the half's previous piece accumulated
            clock.mark(PH_BWD_SYNC);
            try {   // (no exception may leave the parallel region; the caller throws)
                piece(k, h, clock);
            } catch (...) {
                __atomic_store_n(&failed.v, 1, __ATOMIC_RELAXED);
            }
            __atomic_store_n(&fin[h].v, k + 1, __ATOMIC_RELEASE);
        }
    };
    run_team(2, [&](int tid, int team) {
        if (tid == (team > 1 ? 1 : 0)) {   // the input gradients' packed W_ih (if dx is asked for)
            if (bj.dx) pack_b<T>(false, GH, I, j.w.w_ih, I, pki);
            __atomic_store_n(&pki_ready.v, 1, __ATOMIC_RELEASE);
        }
        if (tid > 0) {
            if (tid == 1) pieces(tid);
            return;
        }
        PhaseClock clock(0);
#ifdef RNNCORE_AMX_GEMM
        if constexpr (same_type<T, float>::value) {
            if (amx_dhp) amx_dh_pack(j.w.w_hh, P, Kc, ghx, 0, P, pk);
        }
#endif
        if (!amx_dhp) pack_b<T>(false, Kc, P, j.w.w_hh, P, pk);
        clock.mark(PH_BWD_PACK);
        for (int64_t q = TT - 1; q >= 0; --q) {
            const int64_t t = rev ? TT - 1 - q : q;
            T* dgt = bj.dgx + t * B * LD;
            T* dght = dgh + t * B * LD;
            for (int64_t b = 0; b < B; ++b) {   // dh += dy on the rows that produced an output
                if (!bj.dy || !active(j.lengths, b, t)) continue;
                add_row<T>(P, bj.dy + (t * B + b) * bj.ldy, bj.dh + b * P);
            }
            for (int64_t b = 0; b < B; ++b)   // the gate gradients, part by part of the forward's team
                for (int f = 0; f < nparts; ++f) {
                    const Part U = part(H, nparts, f, VL<T>);
                    const int64_t nh = U.size(), u0 = U.lo;
                    if (nh == 0) continue;
                    const T* g = gteam > 0 ? j.gates + gate_offset(TT, B, GH, G, SB, rev, t, b, u0, nh)
                                           : j.gates + (t * B + b) * GH + u0;
                    bwd_gate_row<T>(bj, ghx, t, b, u0, nh, g, gteam > 0 ? nh : H, bj.dh + b * P + u0,
                                    dgt + b * LD, dght + b * LD, dhd ? dhd + b * H + u0 : nullptr,
                                    bsum ? bsum + G * u0 : nullptr, two_bias ? bsumh + G * u0 + 2 * nh : nullptr);
                }
            clock.mark(PH_BWD_CELL);
            // dh of the previous step: dG @ W_hh (the reset-after GRU's r and z from dgx)
            if (amx_dhp) {
#ifdef RNNCORE_AMX_GEMM
                if constexpr (same_type<T, float>::value) amx_dh(B, P, Kc, ghx, dgt, dght, LD, pk, tmp, P, buf[6]);
#endif
            } else {
                if (ghx > 0) gemm_pb<T>(B, P, ghx, dgt, LD, pk, T(0), tmp, P, q & 1, Kc);
                gemm_pb<T>(B, P, Kc - ghx, dght + ghx, LD, pk + ghx * NR<T>, T(ghx > 0), tmp, P, q & 1, Kc);
            }
            clock.mark(PH_BWD_PRODUCT);
            dh_rows<T>(B, P, j.lengths, t, tmp, P, gru ? dhd : nullptr, H, bj.dh, P);
            __atomic_store_n(&done.v, TT - q, __ATOMIC_RELEASE);   // step q's dG complete
            clock.mark(PH_BWD_CELL);
        }
        for (int f = 0; f < nparts && bsum; ++f) {
            const Part U = part(H, nparts, f, VL<T>);
            for (int g = 0; g < G && U.size() > 0; ++g) {
                add_row<T>(U.size(), bsum + G * U.lo + g * U.size(), bj.g.b_ih + g * H + U.lo);
                add_row<T>(U.size(), (g * H < ghx ? bsum : bsumh) + G * U.lo + g * U.size(),
                           bj.g.b_hh + g * H + U.lo);
            }
        }
        await_count(&pki_ready.v, 1);
        pieces(0);
    });
    scratch_free(mem);
    if (failed.v) throw std::bad_alloc();
}

template <class T> void dir_backward(const DirBackJob<T>& bj) {
    const DirJob<T>& j = bj.f;
    const int64_t TT = j.steps, B = j.batch, I = j.in, H = j.hid, P = j.out;
    RNNCORE_CELL_DIMS(j.cell, H, P, j.lbr);
    const int rev = j.reverse ? 1 : 0;
    T* dh = bj.dh;
    T* dgh = (gru && j.lbr) ? bj.dgh : bj.dgx;
    // The reset-after GRU's dgh holds only its n columns (gru_bwd_row): the hidden-side
    // columns below ghx are read from dgx, which holds the same values (the dh product in two
    // parts, the weight gradient from two sources: gemm_parts' A2). Not writing and summing the
    // r and z copies: training, two threads, old and new build alternating in one process (ms):
    // T=100 B=64 I=256 H=512 139.3 -> 133.6 (the backward gate pass 12.8 -> 9.6), T=50 B=32
    // I=H=1024 170.6 -> 165.9, T=100 B=16 I=128 H=256 9.9 -> 9.7.
    const int64_t ghx = (gru && j.lbr) ? 2 * H : 0;
    const int64_t Kc = gru_orig ? 2 * H : GH;   // rows of W_hh in the dh product
    const int64_t LD = bj.ldg ? bj.ldg : GH;    // row stride of dgx and dgh
    // Gate activations blocked by the forward's team (gate_offset): the same team reads them.
    int gteam = j.gate_team ? *j.gate_team : 0;
    const int64_t SB = fuse_steps(B);
    const int rec = rec_threads(B, G, H, P);
    const int rteam = j.max_threads > 0 && rec > j.max_threads ? j.max_threads : rec;   // (the pipeline: 1)
    // A team of one's blocks in time order are the row-major array (gate_offset), whatever
    // their steps: read as such by any team (the layer pipeline's layers, run on one thread
    // each, and small layers).
    if (gteam == 1 && !rev) gteam = 0;
    if (gteam > 0 && gteam != rteam) {   // the thread count changed since
        unblock_gates<T>(j, gteam);
        gteam = 0;
    }
    // Pipelined (pipe_backward): a team of two, more than four batch rows (fewer: one core
    // alone reads the whole W_hh from its L2 every step, where two read half each: batch 1
    // ran 1.1-1.2 times as long), the whole packed W_hh within 3/4 of the L2, or within twice
    // the L2 at PIPE_WIDE_B batch rows or more (enough rows a step for one core's product to
    // run at the GEMM's rate from the L3), and at least four blocks of steps. Beyond 3/4 of
    // the L2, training, two threads, one process against the split recurrence (benchmarks/
    // ab.py, new/old, blocks of 256 rows): GRU T=100 I=256 H=512 (3 MiB) B=64 0.978-0.985
    // (the dh product 1.98, the weight and input gradients 0.47 and 0.44 of their time on the
    // other thread), T=50 B=128 0.976, B=32 0.994, B=16 1.048; LSTM H=512 (4 MiB) B=64 0.995,
    // B=32 1.021; RNN H=1024 (4 MiB) B=64 0.992, B=32 0.984-1.022; T=50 B=32 I=H=1024 (12-16
    // MiB, streamed) GRU 1.059, RNN 1.028, LSTM 1.082. Also a recurrence that runs
    // on one thread anyway (a step under TEAM_MIN_MACS), with a second thread for the weight
    // gradients: training step, T=100, one process against the layer-by-layer build, B=1 LSTM
    // I=32 H=64 0.925, GRU I=64 H=128 0.918, RNN 0.951; B=2 LSTM I=32 H=64 0.873; B=4 LSTM I=16
    // H=32 0.895, GRU I=32 H=64 0.795. (Not inside the layer pipeline, whose other threads run
    // the other layers.)
    const int64_t pk_bytes = packed_b_size<T>(Kc, P) * (int64_t)sizeof(T);
    if (((rteam == 2 && B > SMALL_B) || (rteam == 1 && threads_for_kernels() >= 2)) && !proj && !gru_orig &&
        ceil_div(TT, pipe_steps(TT, B)) >= 4 && !bj.dy_ready && !bj.dx_ready &&
        (split_fits(pk_bytes) || (B >= PIPE_WIDE_B && pk_bytes <= 2 * l2_cache_bytes()))) {
        pipe_backward<T>(bj, gteam, ghx, Kc, LD, dgh);
        if (lstm && j.peephole) peephole_grads<T>(bj);
        return;
    }
    int failed = 0, mismatch = 0;
    // At up to four batch rows, where a thread's packed column slice of W_hh would exceed twice
    // the L2 (so it streams from the L3 every step either way), the dh product reads W_hh in
    // place by rows: each thread multiplies its own units' gate gradients by their rows of
    // W_hh (contiguous: the rows it streamed in the forward) into a partial dh over all P
    // outputs and, after the step's barrier, sums the team's partials over its own output
    // slice. That saves the per-call packed copy (one read and one write of the slice, 8 MiB
    // a thread at LSTM H=1024, and the memory the peers' data lose to it). Measured on the
    // AVX-512 Xeon (2 MiB of L2 a core), training step, two threads, alternating in one
    // process (ms, packed / by rows): T=25 I=H=1024 LSTM B=1 21.6-22.0 / 20.0-20.4, B=4
    // 31.7-33.7 / 28.2-28.6, GRU B=2 17.2-17.8 / 16.0-16.4; T=100 B=1 I=H=1024 LSTM 71.6-72.8
    // / 68.3-69.3, GRU 48.7-50.2 / 49.4-49.6. Slices of one to two L2s stay packed: LSTM T=100
    // B=1 I=256 H=512 (2 MiB) 8.7-8.9 / 9.6-10.1, RNN T=25 B=4 I=H=1024 (2 MiB) 6.1-6.4 /
    // 6.3-6.6 (with the snake order most of a packed slice stays in the L2). The short path
    // (up to 16 steps: nothing packed) takes it at every size: its column slice read in place
    // took each row's part in runs of 512 bytes or less, once per 128 columns (one process,
    // alternating, ms, column slice / by rows): training LSTM T=16 B=1 I=H=1024 16.3-16.7 /
    // 12.2-12.3, I=H=512 3.12-3.15 / 2.08-2.14 (one thread 7.2-7.3 / 5.1), GRU T=10 B=1 I=H=1024
    // 7.4-7.6 / 5.7-5.9, GRU T=12 B=2 I=256 H=512 2.03-2.08 / 1.44-1.46, LSTM T=8 B=4 I=H=1024
    // 12.2-13.0 / 10.2-11.0, RNN T=10 B=4 I=H=1024 3.16-3.24 / 2.82-2.88; LSTM T=16 B=1 I=128
    // H=256 0.44-0.48 / 0.41-0.46; I=32 H=64 alike.
    const bool rows_dh_shape = B <= SMALL_B && !gru_orig && !proj;
    auto rows_dh_team = [&](int team) {   // from the largest thread's slice: alike in a team
        if (TT <= SMALL_T) return true;
        const int64_t nmax = ceil_div(ceil_div(H, (int64_t)VL<T>), (int64_t)team) * VL<T>;
        return packed_b_size<T>(Kc, nmax < H ? nmax : H) * (int64_t)sizeof(T) > 2 * l2_cache_bytes();
    };
    const int max_team = gteam > rteam ? gteam : rteam;
    // The layer pipeline (dx_ready; a forward-direction team of one): dx a block of steps at a
    // time as the loop finishes them, from W_ih packed once, so that the layer below can start.
    const bool dx_blocks = bj.dx_ready && rteam == 1 && !rev;
    const int64_t DXS = ceil_div(PIPE_FUSE_ROWS, B);   // steps of a block
    T* rows_dh = rows_dh_shape && TT > 0 && rows_dh_team(max_team) ? alloc<T>(2 * max_team * B * P) : nullptr;
    T* pki = nullptr;
    if (dx_blocks && TT > 0) {
        pki = static_cast<T*>(aligned_buffer((size_t)packed_b_size<T>(GH, I) * sizeof(T)));
        if (!pki) {
            std::free(rows_dh);
            throw std::bad_alloc();
        }
        pack_b<T>(false, GH, I, j.w.w_ih, I, pki);
    }
    StepBarrier sbar;
    auto body = [&](int tid, int team) {
        PhaseClock clock(tid);
        if (gteam > 0 && team != gteam) {   // fewer threads than asked for (nested, limits)
            if (tid == 0) mismatch = 1;
            return;
        }
        sbar.join(team);
        StepBarrier::Local bsense(tid);
        const Part U = part(H, team, tid, VL<T>);
        const Part Q = proj ? part(P, team, tid, VL<T>) : U;
        const int64_t nh = U.size(), nq = Q.size(), u0 = U.lo, q0 = Q.lo;
        const bool small = B <= SMALL_B && TT <= SMALL_T;   // row-major weights read in place
        // Split-phase step barrier (step C below), as in the forward.
        // W_hh in place by rows (rows_dh above), decided alike by every thread of the team
        const bool inplace = rows_dh && rows_dh_team(team);
#ifdef RNNCORE_AMX_GEMM
        // The dh product on the tile unit (W_hh's column slice in its parts, a step's dG split
        // once), without the split phase (it takes its slice's k in two blocks, not around the
        // own units' rows of each gate)
        const bool amx_dhp = same_type<T, float>::value && !small && !inplace && !gru_orig && !proj && P >= 32 * team &&
                             amx_dh_takes(B, nq, Kc, ghx, packed_b_size<T>(Kc, nq) * (int64_t)sizeof(T));
        const int64_t nap = amx_dhp ? amx_dh_a_elems(B, Kc, ghx) : 0;
#else
        const bool amx_dhp = false;
        const int64_t nap = 0;
#endif
        const bool split = !small && !inplace && team > 1 && !gru_orig && !proj && !amx_dhp &&
                           split_fits(packed_b_size<T>(Kc, nq) * (int64_t)sizeof(T));
        const int64_t npk = small || inplace ? 0
#ifdef RNNCORE_AMX_GEMM
                            : amx_dhp ? amx_dh_elems(Kc, ghx, nq)
#endif
                            : packed_b_size<T>(Kc, nq);
        const bool two_bias = bj.g.b_ih && dgh != bj.dgx;
        const int64_t sizes[9] = {npk, B * (nh > nq ? nh : nq),
                                  gru_orig && !small ? packed_b_size<T>(H, nh) : 0,
                                  proj && !small ? packed_b_size<T>(P, nh) : 0, proj ? B * nh : 0,
                                  gru ? B * nh : 0, bj.g.b_ih ? G * nh : 0, two_bias ? G * nh : 0, nap};
        T* buf[9];
        T* mem = team_carve<T>(sizes, buf, &failed, team);
        if (!mem) return;
        // The packed weights exceed the L2: they come from the L3 every step (gemm_pb)
        const bool stream = !split_fits((sizes[0] + sizes[2] + sizes[3]) * (int64_t)sizeof(T));
        T *pk = buf[0], *tmp = buf[1], *pkn = buf[2], *pkr = buf[3], *dmb = buf[4];
        T* dhd = buf[5];     // dh * z (+ d(r*h) * r), own units
        // Bias gradients of the own units: the step's gate gradients summed while in cache.
        T *bsum = buf[6], *bsumh = two_bias ? buf[7] : buf[6];
        if (bsum) std::memset(bsum, 0, sizeof(T) * G * nh);
        if (two_bias) std::memset(bsumh, 0, sizeof(T) * G * nh);
        // The step's bias gradients summed by the gate pass as it computes them (a second pass
        // over the rows just written took 14% of the backward's gate pass, LSTM T=100 B=16
        // H=256), except Cho's GRU, whose r gate comes after the step's second product.
        T* const fbias = gru_orig ? nullptr : bsum;
#ifdef RNNCORE_AMX_GEMM
        if constexpr (same_type<T, float>::value) {
            if (nq > 0 && amx_dhp) amx_dh_pack(j.w.w_hh, P, Kc, ghx, q0, nq, pk);
        }
#endif
        if (nq > 0 && !small && !inplace && !amx_dhp) pack_b<T>(false, Kc, nq, j.w.w_hh + q0, P, pk);
        if (gru_orig && nh > 0 && !small) pack_b<T>(false, H, nh, j.w.w_hh + 2 * H * H + u0, H, pkn);
        if (proj && nh > 0 && !small) pack_b<T>(false, P, nh, j.w.w_hr + u0, H, pkr);
        clock.mark(PH_BWD_PACK);

        for (int64_t q = TT - 1; q >= 0; --q) {
            const int64_t t = rev ? TT - 1 - q : q;
            const T* hprev = j.hbuf + (t + rev) * B * P;
            if (bj.dy_ready) await_count(bj.dy_ready, TT - q);   // dy of this step written (from the last)
            auto grow = [&](int64_t b) {   // gate stride gs
                return gteam > 0 ? j.gates + gate_offset(TT, B, GH, G, SB, rev, t, b, u0, nh)
                                 : j.gates + (t * B + b) * GH + u0;
            };
            const int64_t gs = gteam > 0 ? nh : H;
            T* dgt = bj.dgx + t * B * LD;
            T* dght = dgh + t * B * LD;
            // A. dh += dy on the rows that produced an output (own output slice)
            for (int64_t b = 0; b < B && nq > 0; ++b) {
                const bool act = active(j.lengths, b, t);
                T* dhb = dh + b * P + q0;
                if (act && bj.dy) {
                    const T* dyb = bj.dy + (t * B + b) * bj.ldy + q0;
                    for (int64_t k = 0; k < nq; ++k) dhb[k] += dyb[k];
                }
                if (proj) {
                    T* s = bj.dhs + (t * B + b) * P + q0;
                    if (act) std::memcpy(s, dhb, sizeof(T) * nq);
                    else std::memset(s, 0, sizeof(T) * nq);
                }
            }
            if (proj) {
                sbar.wait(bsense);   // dh of the step complete: dm = dh @ W_hr (own units)
                if (nh > 0 && small)
                    small_nn<T>(B, P, nh, j.w.w_hr + u0, H, bj.dhs + t * B * P, P, dmb, nh);
                else if (nh > 0)
                    gemm_pb<T>(B, nh, P, bj.dhs + t * B * P, P, pkr, T(0), dmb, nh, false, 0, stream);
            }
            // B. gate gradients of the own units
            for (int64_t b = 0; b < B && nh > 0; ++b)
                bwd_gate_row<T>(bj, ghx, t, b, u0, nh, grow(b), gs, proj ? dmb + b * nh : dh + b * P + u0,
                                dgt + b * LD, dght + b * LD, dhd ? dhd + b * nh : nullptr, fbias,
                                two_bias ? bsumh + 2 * nh : nullptr);
            // In place by rows: this thread's part of dh over its own units' gate rows of
            // W_hh (contiguous rows, the slice the forward streamed), into its partial sum of
            // the step (two sets, by the parity of the step: a thread may still be summing the
            // last step's while another writes this one's)
            clock.mark(PH_BWD_CELL);
            T* own_part = inplace ? rows_dh + ((q & 1) * team + tid) * B * P : nullptr;
            if (inplace && nh > 0) {
                const int64_t kc_rows = SMALL_M_KC_BYTES / (P * (int64_t)sizeof(T));
                snake_chunks(G, nh, kc_rows > 8 ? kc_rows : 8, q & 1, [&](int g, int64_t k0, int64_t kk, int64_t i) {
                    small_nn<T>(B, kk, P, j.w.w_hh + (g * H + u0 + k0) * P, P,
                                (g * H < ghx ? dgt : dght) + g * H + u0 + k0, LD, own_part, P, i == 0 ? T(0) : T(1));
                });
            } else if (inplace) {
                std::memset(own_part, 0, sizeof(T) * B * P);
            }
            // The step's gate gradients complete. Split phase (cells with one barrier a step,
            // packed weights): arrive, take the part of the dh product over the own units' gate
            // columns (written by this thread), then await the others for the rest.
            clock.mark(PH_BWD_PRODUCT);
            if (split) sbar.arrive(bsense);
            else sbar.wait(bsense);
            clock.mark(PH_BWD_SYNC);
            if (gru_orig) {
                if (nh > 0 && small)
                    small_nn<T>(B, H, nh, j.w.w_hh + 2 * H * H + u0, H, dgt + 2 * H, LD, tmp, nh);
                else if (nh > 0)
                    gemm_pb<T>(B, nh, H, dgt + 2 * H, LD, pkn, T(0), tmp, nh, false, 0, stream);
                for (int64_t b = 0; b < B && nh > 0; ++b) {
                    if (!active(j.lengths, b, t)) continue;
                    gru_orig_r_row<T>(nh, grow(b), hprev + b * P + u0, tmp + b * nh,
                                      dgt + b * LD + u0, dhd + b * nh);
                }
                sbar.wait(bsense);   // the r gate gradients complete
            }
            // C. dh of the previous step, own output slice
            if (nq > 0 && small && !inplace) {
                if (ghx > 0) small_nn<T>(B, ghx, nq, j.w.w_hh + q0, P, dgt, LD, tmp, nq);
                small_nn<T>(B, Kc - ghx, nq, j.w.w_hh + ghx * P + q0, P, dght + ghx, LD, tmp, nq, T(ghx > 0));
            } else if (nq > 0 && inplace) {   // the team's partial sums over the own slice
                const T* parts = rows_dh + (q & 1) * team * B * P;
                for (int64_t b = 0; b < B; ++b) {
                    T* tb = tmp + b * nq;
                    std::memcpy(tb, parts + b * P + q0, sizeof(T) * nq);
                    for (int u = 1; u < team; ++u) add_row<T>(nq, parts + (u * B + b) * P + q0, tb);
                }
            } else if (split && nq > 0) {   // own units' columns of each gate first
                split_product<T>(B, nq, G, H, u0, nh, dgt, dght, ghx, LD, pk, tmp, nq, q & 1,
                                 [&] { sbar.await(bsense); });
            } else if (split) {
                sbar.await(bsense);
            } else if (nq > 0 && amx_dhp) {
#ifdef RNNCORE_AMX_GEMM
                if constexpr (same_type<T, float>::value) amx_dh(B, nq, Kc, ghx, dgt, dght, LD, pk, tmp, nq, buf[8]);
#endif
            } else if (nq > 0) {
                if (ghx > 0) gemm_pb<T>(B, nq, ghx, dgt, LD, pk, T(0), tmp, nq, q & 1, Kc, stream);
                gemm_pb<T>(B, nq, Kc - ghx, dght + ghx, LD, pk + ghx * NR<T>, T(ghx > 0), tmp, nq, q & 1, Kc, stream);
            }
            clock.mark(PH_BWD_PRODUCT);   // (with the split phase, its wait for the others)
            if (nq > 0) dh_rows<T>(B, nq, j.lengths, t, tmp, nq, gru ? dhd : nullptr, nh, dh + q0, P);
            for (int64_t b = 0; b < B && bsum && !fbias && nh > 0; ++b) {   // (Cho's GRU: r comes later)
                if (!active(j.lengths, b, t)) continue;
                for (int g = 0; g < G; ++g) add_row<T>(nh, dgt + b * LD + g * H + u0, bsum + g * nh);
            }
            clock.mark(PH_BWD_CELL);
            if (pki && ((TT - q) % DXS == 0 || q == 0)) {   // dx of the block's steps [q, q + ns)
                const int64_t ns = (TT - q) % DXS == 0 ? DXS : (TT - q) % DXS;
                T* dxr = bj.dx + q * B * I;
                gemm_pb<T>(ns * B, I, GH, bj.dgx + q * B * LD, LD, pki, T(0), dxr, I);
                if (bj.dx_mask) {
                    const T* mk = bj.dx_mask + q * B * I;
                    for (int64_t k = 0; k < ns * B * I; ++k) dxr[k] *= mk[k];
                }
                __atomic_store_n(bj.dx_ready, TT - q, __ATOMIC_RELEASE);
                clock.mark(PH_BWD_INPUT);
            }
        }
        for (int g = 0; g < G && bsum && nh > 0; ++g) {   // disjoint ranges: no race
            add_row<T>(nh, bsum + g * nh, bj.g.b_ih + g * H + u0);
            add_row<T>(nh, (g * H < ghx ? bsum : bsumh) + g * nh, bj.g.b_hh + g * H + u0);
        }
        scratch_free(mem);
    };
    run_team(gteam > 0 ? gteam : rteam, body);
    if (mismatch) {   // the team differs from the forward's: row-major gates, any team
        unblock_gates<T>(j, gteam);
        gteam = 0;
        run_team(rteam, body);
    }
    std::free(rows_dh);
    std::free(pki);
    if (failed) throw std::bad_alloc();

    // Weight gradients: GEMMs over all steps (dW_ih and dW_hh in one where they share dG).
    PhaseClock clock(0);   // the calling thread's wall time of the team's GEMMs
    const int64_t R = TT * B;
    const T* Hprev = j.hbuf + rev * B * P;   // states entering steps 0..T-1, time order
    if (gru_orig) {
        gemm<T>(true, false, GH, I, R, T(1), bj.dgx, LD, j.x, I, T(1), bj.g.w_ih, I);
        gemm<T>(true, false, 2 * H, H, R, T(1), bj.dgx, LD, Hprev, P, T(1), bj.g.w_hh, H);
        gemm<T>(true, false, H, H, R, T(1), bj.dgx + 2 * H, LD, j.extra, H, T(1),
                bj.g.w_hh + 2 * H * H, H);
    } else {
        weight_grads<T>(bj, ghx, LD, dgh, 0, R, 0, GH);
    }
    if (proj) gemm<T>(true, false, P, H, R, T(1), bj.dhs, P, j.mbuf, H, T(1), bj.g.w_hr, H);
    if (lstm && j.peephole) peephole_grads<T>(bj);
    clock.mark(PH_BWD_WEIGHTS);
    if (!dx_blocks && bj.dx) {   // (no dx asked for: the caller needs no input gradient)
        gemm<T>(false, false, R, I, GH, T(1), bj.dgx, LD, j.w.w_ih, I,
                bj.dx_accumulate ? T(1) : T(0), bj.dx, I);
        for (int64_t k = 0; bj.dx_mask && k < R * I; ++k) bj.dx[k] *= bj.dx_mask[k];
        if (bj.dx_ready) __atomic_store_n(bj.dx_ready, TT, __ATOMIC_RELEASE);
    }
    clock.mark(PH_BWD_INPUT);
}

// ------------------------------------------------------------------ streaming step
// The streaming step's matrix-vector products: long rows (from L3 or memory) one after
// another as one stream (gemv_stream), short rows a register's worth at a time (gemv_rows).
template <class T>
inline void step_gemv(int64_t N, int64_t K, const T* W, int64_t ldw, const T* x, T* y) {
    if (K >= 512) gemv_stream<T>(N, K, W, ldw, x, y);
    else gemv_rows<T>(N, K, W, ldw, x, T(0), y);
}

// Threads for one streaming step: the hidden units are split over the team, each thread
// streaming its rows of the weights (as the batch-1 recurrence does), at least `grain` units
// a thread. A step is one parallel region (1-2 us with the workers spinning, tens of us when
// they sleep), so small layers stay on the calling thread. Measured on a Zen 3 (2 cores; one
// `step` from Python, B=1, two threads against one, alternating processes, back to back):
// LSTM I=128 H=256 33 -> 21 us, I=256 H=512 120 -> 61, I=H=1024 1.56 -> 0.73 ms; GRU I=H=256
// 30 -> 18 us, I=H=1024 0.91 -> 0.39 ms; RNN I=H=256 11 -> 7 us. At 7e4-1e5 multiply-adds
// a step 15-25% faster (GRU I=64 H=128 6.8 -> 5.9 us), at 3e4-4e4 no faster; with idle gaps
// between steps (the workers asleep) the smallest threaded layers lost 2-4 us.
constexpr double STEP_MIN_MACS = 9.0e4;
// Several batch rows (one pass over the weights serves up to four: small_nt) gain less from a
// team: two Xeon cores (AVX-512), one `step` from Python, one thread against two (us): I=32
// H=64 LSTM B=4 (1e5 multiply-adds) 6.4-7.3 / 10.4-11.8, B=8 12.1-13.3 / 14.0-14.6, GRU B=8
// 8.7-9.3 / 11.0, RNN B=16 6.4-6.7 / 9.1-9.6; I=64 H=128 RNN B=4 5.0 / 6.1, LSTM B=2 (2e5)
// 10.7 / 10.7; teams ahead from 2.2e5: GRU I=64 H=128 B=3 11.9 / 9.7, LSTM B=3 16.1 / 13.4.
constexpr double STEP_MIN_MACS_ROWS = 2.0e5;
template <class T> int step_threads(const StepJob<T>& j, int64_t grain, double min_macs = STEP_MIN_MACS) {
#ifdef _OPENMP
    const int avail = threads_for_kernels();
    if (avail <= 1 || omp_in_parallel()) return 1;
    const int G = cell_dims(j.cell, j.hid, j.out, j.lbr).G;
    const double macs = (double)j.batch * ((double)G * j.hid * (j.in + j.out) +
                                           (j.out != j.hid ? (double)j.out * j.hid : 0.0));
    if (macs < min_macs) return 1;
    const int64_t by_units = j.hid / grain > 1 ? j.hid / grain : 1;
    return (int)(avail < by_units ? avail : by_units);
#else
    (void)j; (void)grain; (void)min_macs;
    return 1;
#endif
}

// One step of one layer; `prod(mat, v, ldv, out, ldo, r0, n)` computes rows [r0, r0 + n) of
// M v for the B batch rows of v (row stride ldv) into columns [r0, r0 + n) of out (row stride
// ldo), for mat = IH (W_ih, GH x I), HH (W_hh, GH x P; Cho's GRU: its r,z rows, 2H x H), HN
// (Cho's GRU: W_hn, H x H) or HR (W_hr, P x H): one pass over the weights serves up to four
// batch rows. The plain and the packed step differ only in that product. Thread `tid` of a
// team of `team` computes its slice of the hidden units (and of the output features: the
// projection) for every batch row, reading the whole old state, and writes its slice of the
// new state to hnew [B, P]: the caller copies hnew over h once the team is done. Cells that
// need a whole vector midway (the projection's m, Cho's GRU's r * h) meet at a barrier there.
enum StepMat { M_IH, M_HH, M_HN, M_HR };

// The step's scratch, j.work: gx and hh [B, GH], m [B, H], then the new state [B, P].
template <class T> int64_t step_work(const StepJob<T>& j) {
    const int64_t B = j.batch > 1 ? j.batch : 1;
    return B * (2 * cell_dims(j.cell, j.hid, j.out, j.lbr).GH + 2 * j.hid + j.out) + 64;
}
template <class T> T* step_hnew(const StepJob<T>& j) {
    return j.work + j.batch * (2 * cell_dims(j.cell, j.hid, j.out, j.lbr).GH + j.hid);
}

template <class T, class Prod> void step_with(const StepJob<T>& j, Prod&& prod, int tid, int team) {
    const int64_t B = j.batch, I = j.in, H = j.hid, P = j.out;
    RNNCORE_CELL_DIMS(j.cell, H, P, j.lbr);
    T* gx = j.work;            // [B, GH] x side (+ biases)
    T* hh = gx + B * GH;       // [B, GH] hidden side
    T* mall = hh + B * GH;     // [B, H] LSTM with projection: m; GRU: r * h (Cho) or W_hn h
    T* hnall = step_hnew(j);   // [B, P] the new state, after mall
    const T* pi = lstm && j.peephole ? j.w.w_peep : nullptr;
    const Part U = part(H, team, tid, VL<T>);
    const Part Q = proj ? part(P, team, tid, VL<T>) : U;
    const int64_t u0 = U.lo, nh = U.size();
    const int64_t fold = (gru && j.lbr) ? 2 * H : GH;
    // rows of `gates` gates of a matrix for this thread's units, every batch row: one product
    // when the thread has all the units
    auto rows = [&](int mat, const T* v, int64_t ldv, T* out, int gates) {
        if (nh == H) prod(mat, v, ldv, out, GH, 0, gates * H);
        else
            for (int g = 0; g < gates && nh > 0; ++g) prod(mat, v, ldv, out, GH, g * H + u0, nh);
    };
    rows(M_IH, j.x, I, gx, G);
    rows(M_HH, j.h, P, hh, gru_orig ? 2 : G);
    for (int64_t b = 0; b < B && j.w.b_ih; ++b)
        for (int g = 0; g < G; ++g)
            for (int64_t k = g * H + u0; k < g * H + u0 + nh; ++k)
                gx[b * GH + k] += j.w.b_ih[k] + (k < fold ? j.w.b_hh[k] : T(0));
    for (int64_t b = 0; b < B && nh > 0; ++b) {
        T* gb = gx + b * GH;
        const T* hb = hh + b * GH;
        const T* h = j.h + b * P;
        T* m = mall + b * H;
        T* hnew = hnall + b * P;
        if (lstm) {
            T* c = j.c + b * H;
            lstm_fwd_row<T>(nh, gb + u0, gb + H + u0, gb + 2 * H + u0, gb + 3 * H + u0, hb + u0,
                            hb + H + u0, hb + 2 * H + u0, hb + 3 * H + u0, c + u0, c + u0,
                            (proj ? m : hnew) + u0, pi ? pi + u0 : nullptr,
                            pi ? pi + H + u0 : nullptr, pi ? pi + 2 * H + u0 : nullptr, j.coupled);
        } else if (gru_orig) {
            gru_orig_rz_row<T>(nh, gb + u0, gb + H + u0, hb + u0, hb + H + u0, h + u0, m + u0);
        } else if (gru) {
            const T* bhn = j.w.b_hh ? j.w.b_hh + 2 * H : nullptr;
            gru_fwd_row<T>(nh, gb + u0, gb + H + u0, gb + 2 * H + u0, hb + u0, hb + H + u0,
                           hb + 2 * H + u0, bhn ? bhn + u0 : nullptr, h + u0, m + u0, hnew + u0);
        } else {
            rnn_fwd_row<T>(nh, gb + u0, hb + u0, hnew + u0, relu);
        }
    }
    if (proj) {
        barrier(team);   // m complete
        if (Q.size() > 0) prod(M_HR, mall, H, hnall, P, Q.lo, Q.size());
    } else if (gru_orig) {
        barrier(team);   // r * h complete
        if (nh > 0) {
            prod(M_HN, mall, H, hh + 2 * H, GH, u0, nh);
            for (int64_t b = 0; b < B; ++b)
                gru_orig_n_row<T>(nh, gx + b * GH + H + u0, gx + b * GH + 2 * H + u0,
                                  hh + b * GH + 2 * H + u0, j.h + b * P + u0, hnall + b * P + u0);
        }
    }
}

// Runs step_with over a team of `nth` threads, then copies the new state over the old.
template <class T, class Prod> void step_team(const StepJob<T>& j, int nth, Prod&& prod) {
    run_team(nth, [&](int tid, int team) { step_with(j, prod, tid, team); });
    std::memcpy(j.h, step_hnew(j), sizeof(T) * j.batch * j.out);
}

// Y[b, 0:N] = W[0:N, :] X[b, :] for B rows of X, up to four rows per pass over W.
template <class T>
inline void step_rows(int64_t B, int64_t N, int64_t K, const T* W, int64_t ldw, const T* X,
                      int64_t ldx, T* Y, int64_t ldy) {
    for (int64_t b0 = 0; b0 < B; b0 += 4) {
        const int64_t nb = B - b0 < 4 ? B - b0 : 4;
        if (nb == 1) step_gemv<T>(N, K, W, ldw, X + b0 * ldx, Y + b0 * ldy);
        else small_nt<T>(nb, N, K, W, ldw, X + b0 * ldx, ldx, Y + b0 * ldy, ldy);
    }
}

template <class T> void step(const StepJob<T>& j) {
    const int64_t I = j.in, H = j.hid, P = j.out, B = j.batch;
    RNNCORE_CELL_DIMS(j.cell, H, P, j.lbr);
    step_team(j, step_threads(j, 2 * VL<T>, B > 1 ? STEP_MIN_MACS_ROWS : STEP_MIN_MACS), [&](int mat, const T* v, int64_t ldv, T* out, int64_t ldo,
                                                 int64_t r0, int64_t n) {
        switch (mat) {
            case M_IH: step_rows<T>(B, n, I, j.w.w_ih + r0 * I, I, v, ldv, out + r0, ldo); break;
            case M_HH: {   // Cho's GRU: its r,z rows (the first 2H)
                const int64_t K = gru_orig ? H : P;
                step_rows<T>(B, n, K, j.w.w_hh + r0 * K, K, v, ldv, out + r0, ldo);
                break;
            }
            case M_HN: step_rows<T>(B, n, H, j.w.w_hh + (2 * H + r0) * H, H, v, ldv, out + r0, ldo); break;
            default: step_rows<T>(B, n, H, j.w.w_hr + r0 * H, H, v, ldv, out + r0, ldo); break;
        }
    });
}

// Packed streaming step (the C++ Model). Two layouts, chosen from the cell:
//
// Fused (LSTM without projection, GRU with linear_before_reset, RNN): one pass per step. The
// hidden units are cut into groups of UG (two registers; RNN: eight); a group's block holds
// its gate biases (the initial accumulators), then for every input feature k the group's
// columns of W_ih^T row k, then for every state feature the columns of W_hh^T:
//   LSTM: i f g o (2 vectors each) on both sides, 8 accumulators;
//   GRU:  r z n on both sides, n_x and n_h kept apart (n = tanh(n_x + r n_h));
//   RNN:  8 vectors of units on both sides.
// Each weight is read once per step, from one sequential stream per group; the gate
// pre-activations never leave the registers: the cell update runs on the accumulators and
// only the new state is stored.
//
// Otherwise (projected LSTM, Cho's GRU, which need a whole vector midway): W_ih^T [I, GH],
// W_hh^T [P, GH] (Cho's GRU: W_hh[rz]^T [H, 2H] and W_hn^T [H, H]) and W_hr^T [H, P] in
// panel layout, read by the wide micro-kernels, with the row gate passes.
template <class T> struct StepPack { int64_t ih, hh, hn, hr, total; };

enum FusedKind { FUSED_NONE, FUSED_LSTM, FUSED_GRU, FUSED_RNN, FUSED_RNN4 };

template <class T> inline int fused_kind(const StepJob<T>& j) {
    if (j.cell == (int)CellType::LSTM) return j.out == j.hid ? FUSED_LSTM : FUSED_NONE;
    if (j.cell == (int)CellType::GRU) return j.lbr ? FUSED_GRU : FUSED_NONE;
    // The plain RNN's groups: 8 vectors of units, or 4 for layers under two groups of 8 (with
    // two sets of accumulators at one batch row): a group of 8 vectors padded a 64-unit layer to
    // 128 on AVX-512, twice its weights to read. Two Xeon cores, C++ `Model::step`, I=32,
    // alternating (ns, groups of 8 / 4): B=1 H=32 154-166 / 111, H=64 319-328 / 150-152, H=96
    // 461-473 / 380-387, H=128 567-571 / 488-494, H=192 1439-1442 / 1133-1137; B=2 H=64 423-430 /
    // 226-232, H=192 1806-1829 / 1406-1410; B=6 H=64 1005 / 560-569. From two groups of 8 the
    // 8-vector groups were ahead (H=256 B=3 2482-2687 against 2936-3075). With AVX2 (forced)
    // the 4-vector groups lost where they save no padding (H=64, one group of 8: B=1 198-205
    // against 212-247), so there only where they do (H=32 144 -> 103, H=96 483 -> 375).
    const int64_t u8 = 8 * VL<T>, u4 = 4 * VL<T>;
    const bool four = j.hid < 2 * u8 && (VB >= 64 || ceil_div(j.hid, u4) * u4 < ceil_div(j.hid, u8) * u8);
    return four ? FUSED_RNN4 : FUSED_RNN;
}

// Vectors per weight row on the x side / the h side, units per group (the plain RNN: 8 or 4
// vectors of units, FUSED_RNN or FUSED_RNN4; see fused_kind).
// The accumulator each stored vector of a row feeds, x side (AX) and h side (AH): the GRU's
// n_x (accumulators 4, 5) is fed by the x side only, its n_h (6, 7) by the h side only.
template <class T, int K> struct Fused {
    static constexpr int VX = K == FUSED_GRU ? 6 : K == FUSED_RNN4 ? 4 : 8;
    static constexpr int VH = VX;
    static constexpr int64_t UG = K == FUSED_RNN ? 8 * VL<T> : K == FUSED_RNN4 ? 4 * VL<T> : 2 * VL<T>;
    static constexpr int AX[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    static constexpr int AH[8] = {0, 1, 2, 3, K == FUSED_GRU ? 6 : 4, K == FUSED_GRU ? 7 : 5, 6, 7};
};

// Batch rows one pass of the fused step takes at once, each weight vector loaded once for all
// of them: their accumulators (8 vectors a row) stay in registers. AVX-512's 32 registers
// hold three rows' (24 + a weight vector + three broadcasts), AVX2's 16 one row's.
constexpr int FUSED_ROWS = VB >= 64 ? 3 : 1;

// More rows a pass where the accumulators are taken in two halves (the vectors 0-3 of every
// weight row, then the rest; each weight vector still loaded once): 6 x 4 accumulators, a
// weight vector and six broadcasts fit AVX-512's 32 registers; 2 x 4 and three more AVX2's
// 16. Two Xeon cores, C API (us), three whole rows a pass (3 + 1, 3 + 3 + ...) against
// halves: LSTM I=H=512 B=4 199-200 / 120-121, B=16 604-611 / 376-388; LSTM I=128 H=256 B=4
// 16.2-17.2 / 13.7-13.8; GRU I=128 H=256 B=16 40.6-40.7 / 37.7-38.3; five rows in halves
// against six: LSTM I=H=512 B=6 216-220 / 133-136, B=12 342-356 / 263-271. AVX2 forced on the
// Xeon, one row a pass against two in halves: LSTM I=H=512 B=2 184-187 / 118, B=3 268-279 /
// 210-211, LSTM I=128 H=256 B=2 15.2 / 11.9.
constexpr int FUSED_ROWS_HALVES = VB >= 64 ? 6 : VB >= 32 ? 2 : 1;
constexpr int FUSED_MAX = FUSED_ROWS_HALVES > FUSED_ROWS ? FUSED_ROWS_HALVES : FUSED_ROWS;

// The fused blocks of the C++ step (fused_pass) do the same work in less time: their
// threshold scales with the vector width (AVX-512 1.8e5) and doubles from two batch rows where
// a pass takes several (they share its weight loads). Two Xeon cores (AVX-512), C API, one thread
// against two (us): B=1 LSTM I=64 H=128 (1e5 multiply-adds) 3.2-3.3 / 3.8, GRU I=H=128 3.2 /
// 3.7-3.8, GRU I=128 H=256 (3e5) 7.4 / 5.6; B=4 LSTM I=32 H=64 (1e5) 2.7 / 3.8-3.9, B=8 (2e5)
// 4.0 / 4.9-5.1, LSTM I=64 H=128 B=2 (2e5) 3.7-4.2 / 4.7-4.8, B=4 (4e5) 7.2 / 6.9, GRU I=H=128
// B=8 (8e5) 11.4-11.5 / 9.2-9.9. (Python's step, reading the row-major weights, keeps
// STEP_MIN_MACS: there GRU I=H=128 B=1 4.1 us threaded against 5.4 alone, LSTM I=64 H=128
// B=2 8.2-9.0 against 10.7-11.6.)
template <class T> double fused_min_macs(const StepJob<T>& j) {
    return STEP_MIN_MACS * (VB / 32.0) * (FUSED_MAX > 1 && j.batch > 1 ? 2 : 1);
}

// For each of R batch rows r: acc[r][map[v]] += vin[r][k] * (vector v of row k of w), over K
// rows of NV vectors, the vectors v in [V0, V1); returns the end of the rows.
template <class T, int NV, int R, int V0 = 0, int V1 = NV>
inline const T* fused_rows(int64_t K, const T* const* vin, const T* w, const int (&map)[8], VT<T> (*acc)[8]) {
    constexpr int L = VL<T>;
    _Pragma("GCC unroll 4")
    for (int64_t k = 0; k < K; ++k, w += NV * L) {
        T a[R];
        for (int r = 0; r < R; ++r) a[r] = vin[r][k];
        for (int v = V0; v < V1; ++v) {
            VT<T> wv;
            std::memcpy(&wv, w + v * L, sizeof wv);
            for (int r = 0; r < R; ++r) acc[r][map[v]] += a[r] * wv;
        }
    }
    return w;
}

// fused_rows over all NV vectors with the odd rows k into a second set of accumulators, acc2
// (the caller adds them): two chains of dependent FMAs instead of one, where R rows of a few
// vectors are too few accumulators to fill the FMA ports.
template <class T, int NV, int R>
inline const T* fused_rows2(int64_t K, const T* const* vin, const T* w, const int (&map)[8], VT<T> (*acc)[8],
                            VT<T> (*acc2)[8]) {
    constexpr int L = VL<T>;
    int64_t k = 0;
    for (; k + 2 <= K; k += 2, w += 2 * NV * L) {
        T a0[R], a1[R];
        for (int r = 0; r < R; ++r) {
            a0[r] = vin[r][k];
            a1[r] = vin[r][k + 1];
        }
        for (int v = 0; v < NV; ++v) {
            VT<T> w0, w1;
            std::memcpy(&w0, w + v * L, sizeof w0);
            std::memcpy(&w1, w + (NV + v) * L, sizeof w1);
            for (int r = 0; r < R; ++r) {
                acc[r][map[v]] += a0[r] * w0;
                acc2[r][map[v]] += a1[r] * w1;
            }
        }
    }
    if (k == K) return w;
    const T* vt[R];   // the odd last row
    for (int r = 0; r < R; ++r) vt[r] = vin[r] + k;
    return fused_rows<T, NV, R>(K - k, vt, w, map, acc);
}

template <class T, int K> inline int64_t fused_block(int64_t I, int64_t P) {
    return (8 + I * Fused<T, K>::VX + P * Fused<T, K>::VH) * (int64_t)VL<T>;
}

template <class T> StepPack<T> step_pack_layout(const StepJob<T>& j) {
    const int G = j.cell == (int)CellType::LSTM ? 4 : j.cell == (int)CellType::GRU ? 3 : 1;
    const int64_t H = j.hid, P = j.out, GH = G * H;
    const bool gru_orig = j.cell == (int)CellType::GRU && !j.lbr;
    const bool proj = j.cell == (int)CellType::LSTM && P != H;
    StepPack<T> L{};
    switch (fused_kind(j)) {
        case FUSED_LSTM: L.total = ceil_div(H, Fused<T, FUSED_LSTM>::UG) * fused_block<T, FUSED_LSTM>(j.in, P); return L;
        case FUSED_GRU: L.total = ceil_div(H, Fused<T, FUSED_GRU>::UG) * fused_block<T, FUSED_GRU>(j.in, P); return L;
        case FUSED_RNN: L.total = ceil_div(H, Fused<T, FUSED_RNN>::UG) * fused_block<T, FUSED_RNN>(j.in, P); return L;
        case FUSED_RNN4: L.total = ceil_div(H, Fused<T, FUSED_RNN4>::UG) * fused_block<T, FUSED_RNN4>(j.in, P); return L;
        default: break;
    }
    auto r = [](int64_t n) { return (n + 15) / 16 * 16; };
    L.ih = 0;
    L.hh = r(packed_b_size<T>(j.in, GH));
    L.hn = L.hh + r(gru_orig ? packed_b_size<T>(H, 2 * H) : packed_b_size<T>(P, GH));
    L.hr = L.hn + r(gru_orig ? packed_b_size<T>(H, H) : 0);
    L.total = L.hr + r(proj ? packed_b_size<T>(H, P) : 0);
    return L;
}

template <class T> int64_t step_pack_size(const StepJob<T>& j) { return step_pack_layout(j).total; }

// Fills the fused blocks. For accumulator vector q of a group (q < 8), col(q, lane) gives the
// weight row (gate row of W_ih / W_hh, i.e. gate * H + unit) or -1 for padding / no entry.
template <class T, int K> void fused_pack(const StepJob<T>& j, T* out) {
    constexpr int L = VL<T>;
    constexpr int64_t UG = Fused<T, K>::UG;
    const int64_t I = j.in, H = j.hid, P = j.out, ngroups = ceil_div(H, UG);
    const int64_t blk = fused_block<T, K>(I, P);
    // Row of W (x side when hside is false) feeding accumulator q, lane e of group g; -1: none.
    auto row = [&](int64_t g, int q, int e, bool hside) -> int64_t {
        int64_t unit, gate;
        if (K == FUSED_RNN || K == FUSED_RNN4) {
            if (q >= Fused<T, K>::VX) return -1;
            unit = g * UG + q * L + e;
            gate = 0;
        }
        else { unit = g * UG + (q & 1) * L + e; gate = q / 2; }
        if (unit >= H) return -1;
        if (K == FUSED_GRU && gate == 3) { if (!hside) return -1; gate = 2; }   // n_h
        if (K == FUSED_GRU && gate == 2 && hside && q / 2 == 2) return -1;      // n_x: x only
        return gate * H + unit;
    };
    constexpr int nx = Fused<T, K>::VX, nh = Fused<T, K>::VH;
    const int* qx = Fused<T, K>::AX;
    const int* qh = Fused<T, K>::AH;
    for (int64_t g = 0; g < ngroups; ++g) {
        T* b = out + g * blk;
        for (int q = 0; q < 8; ++q)
            for (int e = 0; e < L; ++e) {
                T v = T(0);
                const int64_t rx = row(g, q, e, false), rh = row(g, q, e, true);
                if (j.w.b_ih && rx >= 0) v += j.w.b_ih[rx];
                if (j.w.b_hh && rh >= 0) v += j.w.b_hh[rh];
                b[q * L + e] = v;
            }
        T* wx = b + 8 * L;
        for (int64_t k = 0; k < I; ++k)
            for (int v = 0; v < nx; ++v)
                for (int e = 0; e < L; ++e) {
                    const int64_t r = row(g, qx[v], e, false);
                    wx[(k * nx + v) * L + e] = r >= 0 ? j.w.w_ih[r * I + k] : T(0);
                }
        T* wh = wx + I * nx * L;
        for (int64_t k = 0; k < P; ++k)
            for (int v = 0; v < nh; ++v)
                for (int e = 0; e < L; ++e) {
                    const int64_t r = row(g, qh[v], e, true);
                    wh[(k * nh + v) * L + e] = r >= 0 ? j.w.w_hh[r * P + k] : T(0);
                }
    }
}

// The cell of one batch row on a group's accumulators (units u0 on): h [P] (read), c [H] (LSTM,
// in place), hn [H] out.
template <class T, int K>
inline void fused_cell(const StepJob<T>& j, VT<T>* acc, int64_t u0, const T* h, T* c, T* hn) {
    typedef VT<T> V;
    constexpr int L = VL<T>;
    const int64_t H = j.hid;
    const T* pi = K == FUSED_LSTM && j.peephole ? j.w.w_peep : nullptr;
    if (K == FUSED_RNN || K == FUSED_RNN4) {
        const bool relu = j.cell == (int)CellType::RNN_RELU;
        for (int q = 0; q < Fused<T, K>::VX; ++q) {
            const int64_t u = u0 + q * L;
            if (u >= H) break;
            const V a = acc[q];
            st(hn + u, relu ? (a > T(0) ? a : V{}) : vtanh(a), H - u);
        }
        return;
    }
    if (K == FUSED_LSTM) {   // both registers of units at once (see lstm_cell_n)
        V ci[2], po[2], cn[2], hv[2];
        for (int s = 0; s < 2; ++s) {
            const int64_t u = u0 + s * L, rem = H - u;
            ci[s] = rem > 0 ? ld(c + u, rem) : V{};
            po[s] = V{};
            if (pi && rem > 0) {
                acc[s] += ld(pi + u, rem) * ci[s];
                acc[2 + s] += ld(pi + H + u, rem) * ci[s];
                po[s] = ld(pi + 2 * H + u, rem);
            }
        }
        lstm_cell_n<2>(acc, acc + 2, acc + 4, acc + 6, ci, pi ? po : nullptr, j.coupled, cn, hv);
        for (int s = 0; s < 2; ++s) {
            const int64_t u = u0 + s * L;
            if (u >= H) break;
            st(c + u, cn[s], H - u);
            st(hn + u, hv[s], H - u);
        }
        return;
    }
    for (int s = 0; s < 2; ++s) {   // GRU, linear_before_reset
        const int64_t u = u0 + s * L;
        if (u >= H) break;
        const int64_t rem = H - u;
        const V r = vsigmoid(acc[s]);
        const V z = vsigmoid(acc[2 + s]);
        const V nn = vtanh(acc[4 + s] + r * acc[6 + s]);
        st(hn + u, (splat<T>(1) - z) * nn + z * ld(h + u, rem), rem);
    }
}

// R batch rows (from row b0) through groups [g0, g1), one pass over their fused blocks:
// x [B, I], h [B, P] (read), c [B, H] (LSTM, in place; each group its own units), hn [B, H]
// out (the group's units).
template <class T, int K, int R, bool HALVES = false>
void fused_pass(const StepJob<T>& j, const T* pk, int64_t b0, T* hn, bool rv, int64_t g0, int64_t g1) {
    typedef VT<T> V;
    constexpr int L = VL<T>;
    constexpr int NX = Fused<T, K>::VX, NH = Fused<T, K>::VH;
    constexpr int64_t UG = Fused<T, K>::UG;
    const int64_t I = j.in, H = j.hid, P = j.out;
    const int64_t blk = fused_block<T, K>(I, P);
    const T* xs[R];
    const T* hs[R];
    for (int r = 0; r < R; ++r) {
        xs[r] = j.x + (b0 + r) * I;
        hs[r] = j.h + (b0 + r) * P;
    }
    for (int64_t gi = g0; gi < g1; ++gi) {
        const int64_t g = rv ? g1 - 1 - (gi - g0) : gi;
        const T* b = pk + g * blk;
        V acc[R][8];
        for (int q = 0; q < 8; ++q) {
            V bias;
            std::memcpy(&bias, b + q * L, sizeof(V));
            for (int r = 0; r < R; ++r) acc[r][q] = bias;
        }
        if constexpr (HALVES) {   // accumulators 0-3 (vectors 0-3), then the rest
            const T* w = fused_rows<T, NX, R, 0, 4>(I, xs, b + 8 * L, Fused<T, K>::AX, acc);
            fused_rows<T, NH, R, 0, 4>(P, hs, w, Fused<T, K>::AH, acc);
            if constexpr (NX > 4) {
                fused_rows<T, NX, R, 4, NX>(I, xs, b + 8 * L, Fused<T, K>::AX, acc);
                fused_rows<T, NH, R, 4, NH>(P, hs, w, Fused<T, K>::AH, acc);
            }
        } else if constexpr (R * NX < 8 && K == FUSED_RNN4) {   // 4 vectors at one row: two sets
            V acc2[R][8];
            for (int r = 0; r < R; ++r)
                for (int q = 0; q < 8; ++q) acc2[r][q] = V{};
            const T* w = fused_rows2<T, NX, R>(I, xs, b + 8 * L, Fused<T, K>::AX, acc, acc2);
            fused_rows2<T, NH, R>(P, hs, w, Fused<T, K>::AH, acc, acc2);
            for (int r = 0; r < R; ++r)
                for (int q = 0; q < NX; ++q) acc[r][q] += acc2[r][q];
        } else {
            const T* w = fused_rows<T, NX, R>(I, xs, b + 8 * L, Fused<T, K>::AX, acc);
            fused_rows<T, NH, R>(P, hs, w, Fused<T, K>::AH, acc);
        }
        for (int r = 0; r < R; ++r)
            fused_cell<T, K>(j, acc[r], g * UG, hs[r], j.c ? j.c + (b0 + r) * H : nullptr, hn + (b0 + r) * H);
    }
}

// Rows of the next pass with `left` rows to go (at most FUSED_MAX).
inline int64_t fused_pass_rows(int64_t left) { return left < FUSED_MAX ? left : FUSED_MAX; }

// fused_pass for n rows (R <= n <= FUSED_MAX): whole up to FUSED_ROWS, in halves beyond.
template <class T, int K, int R = 1>
void fused_pass_n(int64_t n, const StepJob<T>& j, const T* pk, int64_t b0, T* hn, bool rv, int64_t g0,
                  int64_t g1) {
    if (n == R) return fused_pass<T, K, R, (R > FUSED_ROWS)>(j, pk, b0, hn, rv, g0, g1);
    if constexpr (R < FUSED_MAX) fused_pass_n<T, K, R + 1>(n, j, pk, b0, hn, rv, g0, g1);
}

// Every batch row through groups [g0, g1), fused_pass_rows rows a pass; pass p sweeps the
// groups backwards where (rv + p) is odd (snake order from pass to pass, as from call to call).
template <class T, int K>
void fused_batch(const StepJob<T>& j, const T* pk, T* hn, unsigned rv, int64_t g0, int64_t g1) {
    for (int64_t b = 0; b < j.batch; ++rv) {
        const int64_t n = fused_pass_rows(j.batch - b);
        fused_pass_n<T, K>(n, j, pk, b, hn, rv & 1, g0, g1);
        b += n;
    }
}

template <class T> void step_pack(const StepJob<T>& j, T* out) {
    switch (fused_kind(j)) {
        case FUSED_LSTM: fused_pack<T, FUSED_LSTM>(j, out); return;
        case FUSED_GRU: fused_pack<T, FUSED_GRU>(j, out); return;
        case FUSED_RNN: fused_pack<T, FUSED_RNN>(j, out); return;
        case FUSED_RNN4: fused_pack<T, FUSED_RNN4>(j, out); return;
        default: break;
    }
    const int G = j.cell == (int)CellType::LSTM ? 4 : j.cell == (int)CellType::GRU ? 3 : 1;
    const int64_t H = j.hid, P = j.out, GH = G * H, I = j.in;
    const bool gru_orig = j.cell == (int)CellType::GRU && !j.lbr;
    const bool proj = j.cell == (int)CellType::LSTM && P != H;
    const StepPack<T> L = step_pack_layout(j);
    pack_b<T>(true, I, GH, j.w.w_ih, I, out + L.ih);
    if (gru_orig) {
        pack_b<T>(true, H, 2 * H, j.w.w_hh, H, out + L.hh);
        pack_b<T>(true, H, H, j.w.w_hh + 2 * H * H, H, out + L.hn);
    } else {
        pack_b<T>(true, P, GH, j.w.w_hh, P, out + L.hh);
    }
    if (proj) pack_b<T>(true, H, P, j.w.w_hr, H, out + L.hr);
}

template <class T> void step_packed(const StepJob<T>& j, const T* pk) {
    const int64_t I = j.in, H = j.hid, P = j.out;
    const int fk = fused_kind(j);
    // From four batch rows the row-major step (one pass over the weights for four rows) beats
    // fused passes of fewer rows: two Zen 3 cores (AVX2, then one row a pass), B=4, LSTM I=128
    // H=256 57 -> 50 us, I=H=512 290 -> 186; at B=2 the fused step is ahead (LSTM I=128 H=256
    // 29.5 against 35.6). With three rows a pass (AVX-512) the fused blocks were ahead: two Xeon
    // cores, C API, B=4 / 8 / 16 (us), LSTM I=128 H=256 16.0-16.2 / 24.2-24.7 / 47-51 against
    // 37-41 / 68-80 / 135-153 row-major, GRU 12.2-12.9 / 19.5 / 36.3-36.5 against 24-28 /
    // 54-57 / 89-93, RNN I=H=256 8.0-8.1 / 13.0-13.2 / 24.0-24.1 against 12.7-12.9 / 20.2-20.4
    // / 38; a layer whose blocks come from the L3 a little behind (LSTM I=H=512 B=4 197-200
    // against 190-192, B=16 598-605 against 571-575) and ahead at B=8 (301-306 against 339-340);
    // with six (halves, FUSED_ROWS_HALVES) ahead there too.
    if (j.batch >= 4 && (fk == FUSED_NONE || FUSED_MAX < 4)) {
        step<T>(j);
        return;
    }
    // Alternate the direction of the weight sweep from pass to pass and call to call ("snake"
    // order): the part of the weights still in L2 from the last pass is read first.
    thread_local unsigned flip = 0;
    const unsigned f0 = flip + 1;
    flip += fk != FUSED_NONE ? (unsigned)ceil_div(j.batch, FUSED_MAX) : 1;
    const bool rv = f0 & 1;
    if (fk != FUSED_NONE) {
        // The groups shared out over the team; hn [B, H] holds the new state until every
        // thread has read the old one.
        const int64_t UG = fk == FUSED_RNN ? Fused<T, FUSED_RNN>::UG
                           : fk == FUSED_RNN4 ? Fused<T, FUSED_RNN4>::UG : Fused<T, FUSED_LSTM>::UG;
        const int64_t ngroups = ceil_div(H, UG);
        T* hn = j.work;
        run_team(step_threads(j, UG, fused_min_macs(j)), [&](int tid, int team) {
            const Part gp = part(ngroups, team, tid, 1);
            if (fk == FUSED_LSTM) fused_batch<T, FUSED_LSTM>(j, pk, hn, f0, gp.lo, gp.hi);
            else if (fk == FUSED_GRU) fused_batch<T, FUSED_GRU>(j, pk, hn, f0, gp.lo, gp.hi);
            else if (fk == FUSED_RNN) fused_batch<T, FUSED_RNN>(j, pk, hn, f0, gp.lo, gp.hi);
            else fused_batch<T, FUSED_RNN4>(j, pk, hn, f0, gp.lo, gp.hi);
        });
        std::memcpy(j.h, hn, sizeof(T) * j.batch * H);
        return;
    }
    // Projected LSTM and Cho's GRU: one thread (the panels' columns cannot be cut at a
    // thread's units), each product over all rows of its matrix (r0 = 0).
    RNNCORE_CELL_DIMS(j.cell, H, P, j.lbr);
    const StepPack<T> L = step_pack_layout(j);
    step_team(j, 1, [&](int mat, const T* v, int64_t ldv, T* out, int64_t ldo, int64_t, int64_t) {
        // the batch rows SMALL_ROWS at a time against all columns of the packed panels
        auto rows = [&](int64_t N, int64_t K, const T* bp) {
            for (int64_t b0 = 0; b0 < j.batch; b0 += SMALL_ROWS) {
                const int64_t mb = j.batch - b0 < SMALL_ROWS ? j.batch - b0 : SMALL_ROWS;
                small_rows<T>(mb, N, K, v + b0 * ldv, ldv, 1, bp, T(1), T(0), out + b0 * ldo, ldo, rv);
            }
        };
        switch (mat) {
            case M_IH: rows(GH, I, pk + L.ih); break;
            case M_HH:
                if (gru_orig) rows(2 * H, H, pk + L.hh);
                else rows(GH, P, pk + L.hh);
                break;
            case M_HN: rows(H, H, pk + L.hn); break;
            default: rows(P, H, pk + L.hr); break;
        }
    });
}

template <class T> void activations(int which, int64_t n, const T* x, T* y) {
    for (int64_t k = 0; k < n; k += VL<T>) {
        const VT<T> v = ld(x + k, n - k);
        st(y + k, which == 0 ? vsigmoid(v) : vtanh(v), n - k);
    }
}

// Read bandwidth of the calling thread over a buffer of `bytes` (L1/L2/L3/memory by size).
template <class T> double read_bandwidth(int64_t bytes, int reps) {
    const int64_t n = bytes / (int64_t)sizeof(float) / 64 * 64;
    if (n <= 0 || reps <= 0) return 0.0;
    float* buf = alloc<float>(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = 1.0f;
    typedef VT<float> V;
    constexpr int L = VL<float>;
    V a0{}, a1{}, a2{}, a3{};
    auto sweep = [&]() {
        for (int64_t i = 0; i < n; i += 4 * L) {
            a0 += ld(buf + i, L); a1 += ld(buf + i + L, L);
            a2 += ld(buf + i + 2 * L, L); a3 += ld(buf + i + 3 * L, L);
        }
    };
    sweep();
    timespec ts0, ts1;
    clock_gettime(CLOCK_MONOTONIC, &ts0);
    for (int r = 0; r < reps; ++r) sweep();
    clock_gettime(CLOCK_MONOTONIC, &ts1);
    const double dt = (double)(ts1.tv_sec - ts0.tv_sec) + 1e-9 * (double)(ts1.tv_nsec - ts0.tv_nsec);
    const V s = a0 + a1 + a2 + a3;
    volatile float sink = s[0];
    (void)sink;
    std::free(buf);
    return dt > 0 ? (double)n * sizeof(float) * reps / dt / 1e9 : 0.0;
}

// One Adam / AdamW step: optim.Adam's NumPy rule in its order of operations, one pass the
// compiler vectorises for this ISA (the core builds with -fno-math-errno).
template <class T, int MODE> void adam_pass(const AdamStep<T>& a) {
    T* __restrict p = a.p;
    const T* __restrict g = a.g;
    T* __restrict m = a.m;
    T* __restrict v = a.v;
    const T b1 = a.b1, b2 = a.b2, c1 = a.c1, c2 = a.c2, eps = a.eps, wd = a.wd, decay = a.decay;
    const T sbc2 = a.sqrt_bc2, lrc = a.lr_bc1;
    for (int64_t i = 0; i < a.n; ++i) {
        T gi = g[i], pi = p[i];
        if (MODE == 1) gi = gi + wd * pi;
        if (MODE == 2) pi = pi * decay;
        const T mi = m[i] * b1 + c1 * gi;
        const T vi = v[i] * b2 + c2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - lrc * mi / (std::sqrt(vi) / sbc2 + eps);
    }
}
// Softmax cross-entropy, row by row: the row's max, exp(z - max) into g (the float exp above,
// ~1 ulp; the C library's for double), the sum, then g scaled by w / sum and w taken off at the
// target. The tail of a row (C not a multiple of the vector) is summed from the stored lanes.
inline VT<double> vexp(VT<double> x) {
    for (int i = 0; i < VL<double>; ++i) x[i] = std::exp(x[i]);
    return x;
}
template <class T> double softmax_xent(int64_t R, int64_t C, const T* z, const int64_t* t, const T* w, T* g) {
    constexpr int L = VL<T>;
    double loss = 0;
    for (int64_t r = 0; r < R; ++r) {
        const T* zr = z + r * C;
        T* gr = g + r * C;
        const T wr = w[r];
        if (wr == T(0)) {
            std::memset(gr, 0, sizeof(T) * C);
            continue;
        }
        T m = zr[0];
        for (int64_t k = 1; k < C; ++k) m = zr[k] > m ? zr[k] : m;
        VT<T> acc{};
        T s = 0;
        int64_t k = 0;
        for (; k + L <= C; k += L) {
            const VT<T> e = vexp(ld(zr + k, L) - m);
            st(gr + k, e, L);
            acc += e;
        }
        if (k < C) {
            st(gr + k, vexp(ld(zr + k, C - k) - m), C - k);
            for (int64_t q = k; q < C; ++q) s += gr[q];
        }
        for (int i = 0; i < L; ++i) s += acc[i];
        loss += (double)wr * (std::log((double)s) - (double)(zr[t[r]] - m));
        const T sc = wr / s;
        for (k = 0; k < C; k += L) st(gr + k, ld(gr + k, C - k) * sc, C - k);
        gr[t[r]] -= wr;
    }
    return loss;
}

template <class T> void adam(const AdamStep<T>& a) {
    if (a.mode == 1) adam_pass<T, 1>(a);
    else if (a.mode == 2) adam_pass<T, 2>(a);
    else adam_pass<T, 0>(a);
}

}  // namespace

extern const KernelTable table;
const KernelTable table = {
    RNNCORE_ISA_NAME,
    {&gemm<float>, &dir_forward<float>, &dir_backward<float>, &step_work<float>, &step<float>, &step_pack_size<float>,
     &step_pack<float>, &step_packed<float>, &activations<float>,
     &read_bandwidth<float>, &adam<float>, &softmax_xent<float>},
    {&gemm<double>, &dir_forward<double>, &dir_backward<double>, &step_work<double>, &step<double>,
     &step_pack_size<double>, &step_pack<double>, &step_packed<double>, &activations<double>,
     &read_bandwidth<double>, &adam<double>, &softmax_xent<double>},
};

}  // namespace RNNCORE_ISA_NS
}  // namespace rnncore
