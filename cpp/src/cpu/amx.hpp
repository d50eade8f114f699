// float32 GEMMs on the AMX tile unit (Sapphire Rapids and later), with float32 accuracy.
// Included by impl.hpp in the AVX-512 unit only, inside its namespaces, where gemm_parts
// hands it the GEMMs it takes (amx_gemm_parts) and the fused blocks of the forward's input
// projection and the per-step recurrent products (forward and backward, from 16 batch rows)
// use gemm_packed_b; run only where amx_active() (dispatch.cpp:
// the CPU has AMX-TILE and AMX-BF16, the OS grants the tile state, not switched off).
//
// Each float32 element x is split exactly into three bfloat16 parts, x = x0 + x1 + x2, by
// truncation: x0 is x with the low 16 bits cleared, x1 the same of x - x0, x2 = x - x0 - x1
// (each subtraction is exact, and x2 has at most 8 significant bits). A product a b is then
// accumulated from the six partial products of order >= 2^-16 relative,
//   a0 b0 + a0 b1 + a1 b0 + a0 b2 + a2 b0 + a1 b1,
// each exact in float32, summed in float32 by TDPBF16PS; the three dropped are below 2^-24
// relative, float32's own rounding. Measured against float64, max |error| / sum |a b|: 3-6e-8
// at K = 1536 with uniform operands (a float32 dot product 1e-7); at most 2.6e-7 over the test
// shapes (the FMA GEMM 3.4e-7). Not bit-identical to the FMA GEMM. A non-finite x keeps x0 = x
// and x1 = x2 = 0: the elements it enters are non-finite, as in float32, but its products with
// the other operand's zero parts make them NaN where float32 may give +-inf. The tile unit
// reads bfloat16 subnormals as zero: parts below 2^-126 (x below about 1e-33) are lost, an
// absolute error under 1e-38 a product.
//
// Layouts (bf16 as uint16_t): an A block is [part][16-row block][32-k chunk][16][32], a tile
// of 16 rows of 32 consecutive k each; a B block is [part][16-column block][32-k chunk][16][32]
// in the tile unit's pair layout: row w holds, for each of 16 columns, k = 2w and 2w + 1. The
// micro-kernel holds a 32 x 32 block of C in tiles 0-3 and streams the parts through tiles
// 4-5 (A) and 6-7 (B): 16 tile loads per 24 products; kernel16 a 16 x 32 block (a batch of
// 16 rows) in tiles 0-1, A's three parts in 2-4, B's in 5-6: 9 tile loads per 12 products.
#pragma once

namespace amx {

typedef uint16_t bf;
// Blocks (one process, alternating, against KC 256 and 128, MC 128, NC 256: these were best or
// level on 1536^3 and the weight-gradient shapes, one and two threads; KC 128 was 0.7 of the
// speed: a pass over C per K block).
constexpr int64_t KC = 512;      // k per block
constexpr int64_t NC = 512;      // columns per B block (3 parts x 512 x 512 x 2 bytes = 1.5 MB)
constexpr int64_t MC = 64;       // rows of A per packed block

// The tile instructions in assembly (AT&T operand order), so that no compiler needs the amx
// target options for this unit (Clang ignores GCC's target pragma): tiles by number, C in 0-3.
#define RNNCORE_TILE_LOAD(t, base, stride) \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t : : "r"(base), "r"((int64_t)(stride)) : "memory")
#define RNNCORE_TILE_STORE(t, base, stride) \
    __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" : : "r"(base), "r"((int64_t)(stride)) : "memory")
#define RNNCORE_TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t : :)
#define RNNCORE_TILE_DP(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c : :)

struct TileCfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Every tile 16 rows of 64 bytes. Per thread; released at the end of the thread's share.
inline void begin() {
    alignas(64) TileCfg c;
    std::memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; ++i) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    // The whole struct as the operand: GCC 12 took its _tile_loadconfig(&c) as reading only the
    // first bytes and dropped the stores of the rows and columns (the tiles then unconfigured:
    // an illegal instruction at the first tile operation).
    __asm__ volatile("ldtilecfg %0" : : "m"(c));
}
inline void end() { __asm__ volatile("tilerelease" : :); }

// The three parts of 16 floats as float32 bit patterns (low 16 bits zero).
inline void split(__m512 x, __m512i& p0, __m512i& p1, __m512i& p2) {
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i u = _mm512_castps_si512(x);
    p0 = _mm512_and_si512(u, hi);
    const __mmask16 nonfinite = _mm512_fpclass_ps_mask(x, 0x99);   // NaN or +-inf
    const __m512 r = _mm512_maskz_sub_ps((__mmask16)~nonfinite, x, _mm512_castsi512_ps(p0));
    p1 = _mm512_and_si512(_mm512_castps_si512(r), hi);
    p2 = _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(r, _mm512_castsi512_ps(p1))), hi);
}

// Pairs: 32-bit words of two parts, `lo` (k even) in the low half and `hi` (k odd) in the high.
inline __m512i pair(__m512i lo, __m512i hi) { return _mm512_or_si512(hi, _mm512_srli_epi32(lo, 16)); }

// 16 parts' bf16 of 16 consecutive elements, in order.
inline __m256i narrow(__m512i p) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(p, 16)); }

// The bf16 of 32 consecutive elements' parts (v: the first 16, w: the next), in order: the
// high 16-bit words of v and w gathered by one permute. A block of 64 rows x 1024 packed from
// the L1 in 0.66 of the time of two narrow()s a row of 32 (0.75 from the L3).
inline __m512i adjacent(__m512i v, __m512i w) {
    const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25,
                                         23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    return _mm512_permutex2var_epi16(v, odd, w);
}

// r[i][j] <- r[j][i], 16 x 16 32-bit words.
inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; ++i) {
            t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
}

inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1); }

// The three parts' bf16 of up to 16 consecutive floats from p (lanes km; the others zero; p is
// not read where km is empty).
inline void run_parts(const float* p, __mmask16 km, __m256i out[3]) {
    __m512i q[3];
    split(km ? _mm512_maskz_loadu_ps(km, p) : _mm512_setzero_ps(), q[0], q[1], q[2]);
    for (int i = 0; i < 3; ++i) out[i] = narrow(q[i]);
}

// Rows [m0, m0 + mm) and k [k0, k0 + kk) of op(A) into an A block of nrb row blocks (zero
// padded) and nkc chunks; ps: elements per part. ta: op(A)[m, k] = A[k lda + m], rows m >=
// msplit from A2 (gemm_parts' second source); else A[m lda + k].
inline void pack_a(bool ta, const float* A, const float* A2, int64_t msplit, int64_t lda, int64_t m0,
                   int64_t mm, int64_t k0, int64_t kk, int64_t nrb, int64_t nkc, bf* out) {
    const int64_t ps = nrb * nkc * 512;
    if (!ta) {
        for (int64_t rb = 0; rb < nrb; ++rb)
            for (int r = 0; r < 16; ++r) {
                const int64_t m = rb * 16 + r;
                const float* row = A + (m0 + m) * lda + k0;
                for (int64_t c = 0; c < nkc; ++c) {
                    bf* d = out + (rb * nkc + c) * 512 + r * 32;
                    const int64_t kb = c * 32;
                    const __mmask16 k0m = m < mm ? lanes(kk - kb) : (__mmask16)0;
                    const __mmask16 k1m = m < mm ? lanes(kk - kb - 16) : (__mmask16)0;
                    __m512i v[3], w[3];
                    split(k0m ? _mm512_maskz_loadu_ps(k0m, row + kb) : _mm512_setzero_ps(), v[0], v[1], v[2]);
                    split(k1m ? _mm512_maskz_loadu_ps(k1m, row + kb + 16) : _mm512_setzero_ps(), w[0], w[1], w[2]);
                    for (int q = 0; q < 3; ++q) _mm512_storeu_si512((void*)(d + q * ps), adjacent(v[q], w[q]));
                }
            }
        return;
    }
    for (int64_t rb = 0; rb < nrb; ++rb) {
        const int64_t mb = m0 + rb * 16;                        // first row of the block
        const __mmask16 valid = lanes(mm - rb * 16);
        const __mmask16 from2 = A2 ? (__mmask16)(valid & ~lanes(msplit - mb)) : (__mmask16)0;
        const __mmask16 from1 = (__mmask16)(valid & ~from2);
        for (int64_t c = 0; c < nkc; ++c) {
            __m512i w[3][16];
            for (int i = 0; i < 16; ++i) {
                __m512i e[3], o[3];
                for (int s = 0; s < 2; ++s) {
                    const int64_t k = c * 32 + 2 * i + s;
                    __m512 x = _mm512_setzero_ps();
                    if (k < kk) {
                        const int64_t off = (k0 + k) * lda + mb;
                        if (from1) x = _mm512_maskz_loadu_ps(from1, A + off);
                        if (from2) x = _mm512_mask_loadu_ps(x, from2, A2 + off);
                    }
                    if (s == 0) split(x, e[0], e[1], e[2]);
                    else split(x, o[0], o[1], o[2]);
                }
                for (int q = 0; q < 3; ++q) w[q][i] = pair(e[q], o[q]);
            }
            for (int q = 0; q < 3; ++q) {
                transpose16(w[q]);
                bf* d = out + q * ps + (rb * nkc + c) * 512;
                for (int r = 0; r < 16; ++r) _mm512_storeu_si512((void*)(d + r * 32), w[q][r]);
            }
        }
    }
}

// Columns [n0, n0 + nn) (nn <= 16) and k [k0, k0 + kk) of op(B) into the 16-column block
// `cb` of a B block of ncb column blocks and nkc chunks. tb: op(B)[k, n] = B[n ldb + k]; else
// B[k ldb + n].
inline void pack_b(bool tb, const float* B, int64_t ldb, int64_t n0, int64_t nn, int64_t k0, int64_t kk,
                   int64_t cb, int64_t ncb, int64_t nkc, bf* out) {
    const int64_t ps = ncb * nkc * 512;
    const __mmask16 nm = lanes(nn);
    for (int64_t c = 0; c < nkc; ++c) {
        bf* d = out + (cb * nkc + c) * 512;
        if (!tb) {
            for (int i = 0; i < 16; ++i) {
                __m512i e[3], o[3];
                for (int s = 0; s < 2; ++s) {
                    const int64_t k = c * 32 + 2 * i + s;
                    const __m512 x = k < kk ? _mm512_maskz_loadu_ps(nm, B + (k0 + k) * ldb + n0) : _mm512_setzero_ps();
                    if (s == 0) split(x, e[0], e[1], e[2]);
                    else split(x, o[0], o[1], o[2]);
                }
                for (int q = 0; q < 3; ++q) _mm512_storeu_si512((void*)(d + q * ps + i * 32), pair(e[q], o[q]));
            }
            continue;
        }
        __m512i w[3][16];
        for (int n = 0; n < 16; ++n) {
            __m256i lo[3], hi[3];
            for (int h = 0; h < 2; ++h) {
                const int64_t kb = c * 32 + h * 16;
                run_parts(B + (n0 + n) * ldb + k0 + kb, n < nn ? lanes(kk - kb) : (__mmask16)0, h == 0 ? lo : hi);
            }
            for (int q = 0; q < 3; ++q)
                w[q][n] = _mm512_inserti64x4(_mm512_castsi256_si512(lo[q]), hi[q], 1);
        }
        for (int q = 0; q < 3; ++q) {
            transpose16(w[q]);
            for (int i = 0; i < 16; ++i) _mm512_storeu_si512((void*)(d + q * ps + i * 32), w[q][i]);
        }
    }
}

// C[32 x 32] (row stride ldc floats) = (load ? C : 0) + A rows (a0: row block, a1: the next)
// times B columns (b0, b1), over nkc chunks; aps, bps: elements per part.
inline void kernel(int64_t nkc, const bf* a0, const bf* a1, int64_t aps, const bf* b0, const bf* b1,
                   int64_t bps, float* c, int64_t ldc, bool load) {
    const int64_t cs = ldc * (int64_t)sizeof(float);
    if (load) {
        RNNCORE_TILE_LOAD(0, c, cs);
        RNNCORE_TILE_LOAD(1, c + 16, cs);
        RNNCORE_TILE_LOAD(2, c + 16 * ldc, cs);
        RNNCORE_TILE_LOAD(3, c + 16 * ldc + 16, cs);
    } else {
        RNNCORE_TILE_ZERO(0);
        RNNCORE_TILE_ZERO(1);
        RNNCORE_TILE_ZERO(2);
        RNNCORE_TILE_ZERO(3);
    }
#define RNNCORE_AMX_4 RNNCORE_TILE_DP(0, 4, 6); RNNCORE_TILE_DP(1, 4, 7); RNNCORE_TILE_DP(2, 5, 6); RNNCORE_TILE_DP(3, 5, 7);
    for (int64_t k = 0; k < nkc; ++k) {
        const int64_t o = k * 512;
        RNNCORE_TILE_LOAD(4, a0 + o, 64);             // a0 b0
        RNNCORE_TILE_LOAD(5, a1 + o, 64);
        RNNCORE_TILE_LOAD(6, b0 + o, 64);
        RNNCORE_TILE_LOAD(7, b1 + o, 64);
        RNNCORE_AMX_4
        RNNCORE_TILE_LOAD(6, b0 + bps + o, 64);       // a0 b1
        RNNCORE_TILE_LOAD(7, b1 + bps + o, 64);
        RNNCORE_AMX_4
        RNNCORE_TILE_LOAD(6, b0 + 2 * bps + o, 64);   // a0 b2
        RNNCORE_TILE_LOAD(7, b1 + 2 * bps + o, 64);
        RNNCORE_AMX_4
        RNNCORE_TILE_LOAD(4, a0 + aps + o, 64);       // a1 b1
        RNNCORE_TILE_LOAD(5, a1 + aps + o, 64);
        RNNCORE_TILE_LOAD(6, b0 + bps + o, 64);
        RNNCORE_TILE_LOAD(7, b1 + bps + o, 64);
        RNNCORE_AMX_4
        RNNCORE_TILE_LOAD(6, b0 + o, 64);             // a1 b0
        RNNCORE_TILE_LOAD(7, b1 + o, 64);
        RNNCORE_AMX_4
        RNNCORE_TILE_LOAD(4, a0 + 2 * aps + o, 64);   // a2 b0
        RNNCORE_TILE_LOAD(5, a1 + 2 * aps + o, 64);
        RNNCORE_AMX_4
    }
#undef RNNCORE_AMX_4
    RNNCORE_TILE_STORE(0, c, cs);
    RNNCORE_TILE_STORE(1, c + 16, cs);
    RNNCORE_TILE_STORE(2, c + 16 * ldc, cs);
    RNNCORE_TILE_STORE(3, c + 16 * ldc + 16, cs);
}

// C[16 x 32] = (load ? C : 0) + the 16 rows of a0 times B columns (b0, b1): for a last row block
// of 16 (a batch of 16 rows), where the 32-row kernel would compute 16 rows of zeros. A's three
// parts in tiles 2-4, each B part in 5-6: 9 tile loads per 12 products.
inline void kernel16(int64_t nkc, const bf* a0, int64_t aps, const bf* b0, const bf* b1, int64_t bps, float* c,
                     int64_t ldc, bool load) {
    const int64_t cs = ldc * (int64_t)sizeof(float);
    if (load) {
        RNNCORE_TILE_LOAD(0, c, cs);
        RNNCORE_TILE_LOAD(1, c + 16, cs);
    } else {
        RNNCORE_TILE_ZERO(0);
        RNNCORE_TILE_ZERO(1);
    }
    for (int64_t k = 0; k < nkc; ++k) {
        const int64_t o = k * 512;
        RNNCORE_TILE_LOAD(2, a0 + o, 64);
        RNNCORE_TILE_LOAD(3, a0 + aps + o, 64);
        RNNCORE_TILE_LOAD(4, a0 + 2 * aps + o, 64);
        RNNCORE_TILE_LOAD(5, b0 + o, 64);             // a0 b0, a1 b0, a2 b0
        RNNCORE_TILE_LOAD(6, b1 + o, 64);
        RNNCORE_TILE_DP(0, 2, 5); RNNCORE_TILE_DP(1, 2, 6);
        RNNCORE_TILE_DP(0, 3, 5); RNNCORE_TILE_DP(1, 3, 6);
        RNNCORE_TILE_DP(0, 4, 5); RNNCORE_TILE_DP(1, 4, 6);
        RNNCORE_TILE_LOAD(5, b0 + bps + o, 64);       // a0 b1, a1 b1
        RNNCORE_TILE_LOAD(6, b1 + bps + o, 64);
        RNNCORE_TILE_DP(0, 2, 5); RNNCORE_TILE_DP(1, 2, 6);
        RNNCORE_TILE_DP(0, 3, 5); RNNCORE_TILE_DP(1, 3, 6);
        RNNCORE_TILE_LOAD(5, b0 + 2 * bps + o, 64);   // a0 b2
        RNNCORE_TILE_LOAD(6, b1 + 2 * bps + o, 64);
        RNNCORE_TILE_DP(0, 2, 5); RNNCORE_TILE_DP(1, 2, 6);
    }
    RNNCORE_TILE_STORE(0, c, cs);
    RNNCORE_TILE_STORE(1, c + 16, cs);
}

// Elements (bf16) of a B block packed by pack_b for all of K: three parts of ncb column blocks.
inline int64_t packed_b_elems(int64_t K, int64_t N) { return 3 * 2 * ceil_div(N, 32) * ceil_div(K, 32) * 512; }
// Elements of an A block of M rows packed by pack_a for all of K.
inline int64_t packed_a_elems(int64_t M, int64_t K) { return 3 * 2 * ceil_div(M, 32) * ceil_div(K, 32) * 512; }

// All K x N of op(B) from a row-major W (stride ldw), packed for gemm_packed_b
// (packed_b_elems(K, N) elements): tb, op(B)[k, n] = W[n ldw + k] (rows of W: the forward's
// W_hh and W_ih slices); else W[k ldw + n] (columns of W: the backward's W_hh).
inline void pack_all_b(bool tb, int64_t K, int64_t N, const float* W, int64_t ldw, bf* out) {
    const int64_t ncb = 2 * ceil_div(N, 32), nkc = ceil_div(K, 32);
    for (int64_t cb = 0; cb < ncb; ++cb) pack_b(tb, W, ldw, cb * 16, N - cb * 16, 0, K, cb, ncb, nkc, out);
}

// C[M x N] (+)= A[M x K] (row-major, stride lda) op(B), op(B) packed by pack_all_b, on the
// calling thread (its tiles configured here); acc: add to C. Ap: packed_a_elems(M, K) elements
// of scratch. Every k at once: C stays in the tiles from the first chunk to the last. With
// a_packed, Ap already holds this A (an earlier call's: several B against one A).
inline void gemm_packed_b(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const bf* Bp, float* C,
                          int64_t ldc, bf* Ap, bool a_packed, bool acc = false) {
    // (row blocks of 16: a last odd one goes through kernel16)
    const int64_t nkc = ceil_div(K, 32), nrb = ceil_div(M, 16), ncb = 2 * ceil_div(N, 32);
    const int64_t aps = nrb * nkc * 512, bps = ncb * nkc * 512;
    if (!a_packed) pack_a(false, A, nullptr, 0, lda, 0, M, 0, K, nrb, nkc, Ap);
    alignas(64) float tmp[32 * 32];
    begin();
    for (int64_t cb = 0; cb < ncb; cb += 2) {
        const int64_t n0 = cb * 16, w = N - n0 < 32 ? N - n0 : 32;
        const bf* b0 = Bp + cb * nkc * 512;
        for (int64_t rb = 0; rb < nrb; rb += 2) {
            const int64_t m0 = rb * 16, mr = M - m0 < 32 ? M - m0 : 32;
            const bf* a0 = Ap + rb * nkc * 512;
            float* c = C + m0 * ldc + n0;
            const bool whole = w == 32 && (mr == 32 || mr == 16);   // C's block stored in place
            float* cc = whole ? c : tmp;
            const int64_t ldcc = whole ? ldc : 32;
            if (!whole && acc)
                for (int64_t r = 0; r < mr; ++r)
                    for (int64_t n = 0; n < w; ++n) tmp[r * 32 + n] = c[r * ldc + n];
            if (mr <= 16)   // a last block of 16 rows or fewer
                kernel16(nkc, a0, aps, b0, b0 + nkc * 512, bps, cc, ldcc, acc);
            else
                kernel(nkc, a0, a0 + nkc * 512, aps, b0, b0 + nkc * 512, bps, cc, ldcc, acc);
            if (!whole)
                for (int64_t r = 0; r < mr; ++r)
                    for (int64_t n = 0; n < w; ++n) c[r * ldc + n] = tmp[r * 32 + n];
        }
    }
    end();
}

}  // namespace amx

// A 32-column block of the parts' columns (one part's; its last may be narrower).
struct AmxCols { int part; int64_t n0, w; };

// gemm_parts on the tile unit (N: the parts' columns together). Blocked as the FMA GEMM: a
// B block (KC x NC, its three parts 1.5 MB) packed by the team, then each thread its share of
// the rows, MC at a time, against every 32-column block of it. Returns false where it does
// not take the GEMM (the caller runs the FMA GEMM).
inline bool amx_gemm_parts(
        bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
        const GemmPart<float>* parts, int nparts, float beta, const float* A2, int64_t msplit) {
    if (alpha != 1.0f || (beta != 0.0f && beta != 1.0f) || M < 32 || N < 32 || K < 32) return false;
    const int64_t kc = K < amx::KC ? K : amx::KC;
    const int64_t nkc_max = ceil_div(kc, 32);
    const int64_t bcap = amx::NC / 32;                            // 32-column blocks per B block
    const int64_t bpart = 2 * bcap * nkc_max * 512;               // elements per part of a B block
    const int64_t apart = (amx::MC / 16) * nkc_max * 512;
    int nth = 1;
#ifdef _OPENMP
    if (!omp_in_parallel()) nth = threads_for_kernels();
#endif
    const int64_t mblocks = ceil_div(M, 32);
    if (nth > mblocks) nth = (int)mblocks;
    if (2.0 * (double)M * (double)N * (double)K < (nth > 1 ? AMX_MIN_FLOPS_TEAM : AMX_MIN_FLOPS)) return false;
    int64_t nblk = 0;
    for (int i = 0; i < nparts; ++i) nblk += ceil_div(parts[i].n > 0 ? parts[i].n : 0, 32);
    AmxCols* cols = static_cast<AmxCols*>(std::malloc((size_t)(nblk > 0 ? nblk : 1) * sizeof(AmxCols)));
    if (!cols) throw std::bad_alloc();
    int64_t nb = 0;
    for (int i = 0; i < nparts; ++i)
        for (int64_t n0 = 0; n0 < parts[i].n; n0 += 32) cols[nb++] = AmxCols{i, n0, parts[i].n - n0 < 32 ? parts[i].n - n0 : 32};
    amx::bf* Bp = static_cast<amx::bf*>(aligned_buffer((size_t)3 * bpart * sizeof(amx::bf)));
    if (!Bp) {
        std::free(cols);
        throw std::bad_alloc();
    }
    int failed = 0;
    run_team(nth, [&](int tid, int team) {
        amx::bf* Ap = static_cast<amx::bf*>(aligned_buffer((size_t)3 * apart * sizeof(amx::bf)));
        if (!Ap) raise_failure(&failed);
        if (team_failed(&failed, team)) {
            std::free(Ap);
            return;
        }
        alignas(64) float tmp[32 * 32];
        amx::begin();
        const Part rows = part(mblocks, team, tid, 1);             // 32-row blocks of this thread
        for (int64_t b0 = 0; b0 < nb; b0 += bcap) {
            const int64_t bn = nb - b0 < bcap ? nb - b0 : bcap;
            const int64_t ncb = 2 * bn;                           // 16-column blocks
            for (int64_t k0 = 0; k0 < K; k0 += kc) {
                const int64_t kk = K - k0 < kc ? K - k0 : kc;
                const int64_t nkc = ceil_div(kk, 32);
                const int64_t bps = ncb * nkc * 512;
                const bool load = k0 > 0 || beta == 1.0f;
                barrier(team);                                    // the last B block is done with
                for (int64_t i = bn * tid / team; i < bn * (tid + 1) / team; ++i) {
                    const AmxCols& q = cols[b0 + i];
                    const GemmPart<float>& pt = parts[q.part];
                    for (int h = 0; h < 2; ++h)
                        amx::pack_b(tb, pt.B, pt.ldb, q.n0 + 16 * h, q.w - 16 * h, k0, kk, 2 * i + h, ncb, nkc, Bp);
                }
                barrier(team);                                    // the B block is complete
                for (int64_t r0 = rows.lo * 32; r0 < rows.hi * 32 && r0 < M; r0 += amx::MC) {
                    const int64_t r1 = r0 + amx::MC < rows.hi * 32 ? r0 + amx::MC : rows.hi * 32;
                    const int64_t mm = (r1 < M ? r1 : M) - r0;
                    const int64_t nrb = 2 * ceil_div(mm, 32);
                    const int64_t aps = nrb * nkc * 512;
                    amx::pack_a(ta, A, A2, msplit, lda, r0, mm, k0, kk, nrb, nkc, Ap);
                    for (int64_t i = 0; i < bn; ++i) {
                        const AmxCols& q = cols[b0 + i];
                        const GemmPart<float>& pt = parts[q.part];
                        const amx::bf* bq = Bp + 2 * i * nkc * 512;
                        for (int64_t rb = 0; rb < nrb; rb += 2) {
                            const int64_t m = r0 + rb * 16, mr = M - m < 32 ? M - m : 32;
                            const amx::bf* aq = Ap + rb * nkc * 512;
                            float* cq = pt.C + m * pt.ldc + q.n0;
                            // The next block of C into the cache, for writing, while this one
                            // runs: its rows lie a row of C apart and come from memory (a pass
                            // over C per K block), which the tile loads and stores wait for.
                            if (rb + 2 < nrb || i + 1 < bn) {
                                const AmxCols& qn = rb + 2 < nrb ? q : cols[b0 + i + 1];
                                const GemmPart<float>& pn = parts[qn.part];
                                const int64_t mn = rb + 2 < nrb ? m + 32 : r0;
                                const int64_t rows_n = M - mn < 32 ? M - mn : 32;
                                const float* cn = pn.C + mn * pn.ldc + qn.n0;
                                for (int64_t r = 0; r < rows_n; ++r) {
                                    __builtin_prefetch(cn + r * pn.ldc, 1, 3);
                                    if (qn.w > 16) __builtin_prefetch(cn + r * pn.ldc + 16, 1, 3);
                                }
                            }
                            if (mr == 32 && q.w == 32) {
                                amx::kernel(nkc, aq, aq + nkc * 512, aps, bq, bq + nkc * 512, bps, cq, pt.ldc, load);
                                continue;
                            }
                            for (int64_t r = 0; r < 32 && load; ++r)
                                for (int64_t n = 0; n < 32; ++n) tmp[r * 32 + n] = r < mr && n < q.w ? cq[r * pt.ldc + n] : 0.0f;
                            amx::kernel(nkc, aq, aq + nkc * 512, aps, bq, bq + nkc * 512, bps, tmp, 32, load);
                            for (int64_t r = 0; r < mr; ++r)
                                for (int64_t n = 0; n < q.w; ++n) cq[r * pt.ldc + n] = tmp[r * 32 + n];
                        }
                    }
                }
            }
        }
        amx::end();
        std::free(Ap);
    });
    std::free(Bp);
    std::free(cols);
    if (failed) throw std::bad_alloc();
    return true;
}
