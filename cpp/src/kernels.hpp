// Internal interface between the stack driver (layer.cpp, compiled for the baseline ISA)
// and the kernels (cpu/impl.hpp, compiled once per ISA into its own namespace).
//
// Rule that keeps per-ISA compilation safe: the ISA translation units use no standard
// library templates that other translation units also instantiate (no std::vector,
// std::unique_ptr, ...). An inline function compiled with -mavx512f in one unit and
// merged by the linker with the baseline copy would crash older CPUs. They see only the
// plain structs below and raw pointers; the driver allocates the sequence buffers, the
// kernels their own per-thread scratch (with malloc).
#pragma once

#include <cstdint>

#include "rnncore/layer.hpp"

namespace rnncore {

// Packed recurrent weights of one direction of one layer, kept across calls by a
// PackedWeights (layer.cpp). Slot t belongs to thread t of the recurrence: its slices of
// W_hh, W_hr and (where the projection does not read it in place) W_ih packed, then its
// per-step scratch, in memory it allocated (with
// std::aligned_alloc; the owner frees it with std::free). `hash` covers the layout (ISA,
// dtype, team, slice) and, unless `trusted`, the content of the rows it was packed from; a
// thread repacks its slot whenever the hash it computes differs.
constexpr int MAX_TEAM = 64;
struct PackSlot {
    void* data;
    int64_t bytes;
    uint64_t hash;
    bool valid;
};
struct PackSet {
    PackSlot slot[MAX_TEAM];
    bool trusted;                   // the weights never change (a loaded Model): hash the
                                    // layout and the weights' address, not their content
    int64_t packs;                  // slots (re)packed so far (tests and statistics)
    // A small layer's way (dir_forward, auto mode): ns per row (x16) of the calls on one thread
    // (0), on one thread with the idle core's projection (1) and on a team of two (2, its packed
    // slices in slot[1] and slot[2]), moving averages (0: not measured yet), and the calls that chose.
    int64_t few_ns[3];
    int64_t few_calls;
};

// One direction of one layer over a whole sequence.
// Slot convention for hbuf [T+1, B, P] and cbuf [T+1, B, H]:
//   forward:  slot t = state entering time step t, slot T = final state;
//   reverse:  slot t+1 = state entering time step t, slot 0 = final state.
// So the state entering step t is slot t + rev, the state leaving it is slot t + 1 - rev,
// and the states entering steps 0..T-1 in time order are contiguous from slot rev.
// With `ring` (inference: nothing reads a past step's state) hbuf and cbuf hold two slots,
// slot s at s & 1, and mbuf and extra one step: the per-step state stays in the cache
// instead of streaming [T+1, B, P] arrays through memory every call.
template <class T> struct DirJob {
    int cell;                       // CellType
    int64_t steps, batch, in, hid, out;   // T, B, I, H, P
    bool peephole, coupled, lbr, reverse;
    const int64_t* lengths;         // [B] or null
    DirParams<T> w;
    const T* x;                     // [T*B, I]
    T* gates;                       // [T, B, G*H]: x-projection, then post-activation gates
                                    // (inference: only on the unpacked path, else may be null)
    T* hbuf;                        // [T+1, B, P] (see slots); entering state preset by driver
    T* cbuf;                        // [T+1, B, H] LSTM, entering state preset by driver
    T* mbuf;                        // [T, B, H] LSTM with projection: o * tanh(c)
    T* extra;                       // [T, B, H] GRU: lbr: W_hn h + b_hn; else r * h
    bool ring;                      // hbuf, cbuf [2, ...], mbuf, extra [1, ...] (see slots)
    T* y; int64_t ldy;              // output rows [T*B] of stride ldy, offset to this direction
    const T* ymask;                 // null, or y is written times this (the next layer's
                                    // dropout mask: the layer pipeline), same rows and stride
    PackSet* packed;                // kept packed weights, or null: pack per call
    bool zero_start;                // the entering state h is all zeros: the first step
                                    // skips its recurrent products (they are zero)
    bool infer;                     // no backward follows: the gate activations need not
                                    // be kept in `gates`
    bool bf16;                      // with infer and float: W_hh and W_hr packed in bfloat16
    int* gate_team;                 // null: `gates` is row-major [T, B, G*H]. Else forward
                                    // stores the team whose blocked layout it wrote (0: none;
                                    // see gate_offset in cpu/impl.hpp), backward reads it
    int max_threads;                // forward: at most this many threads (0: no cap; the
                                    // directions of a bidirectional layer run at once)
    // The layer pipeline (a stack's layers at once: layer.cpp): x_ready, when
    // set, counts the steps of x that the layer below has written so far (x is complete
    // when null); y_ready, when set, is where this job publishes the steps of y it has
    // written (forward direction, a team of one: after each step; else all at the end).
    // GCC __atomic builtins, acquire / release.
    const int64_t* x_ready;
    int64_t* y_ready;
};

template <class T> struct DirBackJob {
    DirJob<T> f;                    // the forward job whose buffers hold the activations
    const T* dy; int64_t ldy;       // [T*B] rows, offset to this direction; may be null
    T* dh;                          // [B, P] in: dL/dh_final, out: dL/dh_initial
    T* dc;                          // [B, H] same for the cell state (LSTM)
    T* dgx;                         // [T, B, G*H] gradient of the x-side pre-activations
    T* dgh;                         // [T, B, G*H] hidden side (GRU lbr only; else null)
    int64_t ldg;                    // row stride of dgx and dgh (>= G*H; 0: G*H)
    T* dhs;                         // [T, B, P] LSTM projection: dh of each step
    DirGrads<T> g;                  // accumulated (+=)
    T* dx; bool dx_accumulate;      // [T*B, I]; null: no input gradient computed
    // The layer pipeline's backward (layer.cpp; a forward-direction team of one): dy_ready,
    // when set, counts the steps of dy, from the last, that the layer above has written (dy
    // is complete when null); dx_ready, when set, is where this job publishes the steps of
    // dx, from the last, that it has written, a block at a time during its time loop, each
    // times dx_mask when set (the dropout mask of this layer's input).
    const int64_t* dy_ready;
    int64_t* dx_ready;
    const T* dx_mask;
};

// One time step of one layer (streaming inference): gates from the row-major weights
// directly (no packing, so nothing can go stale), state updated in place.
template <class T> struct StepJob {
    int cell;
    int64_t batch, in, hid, out;    // B, I, H, P
    bool peephole, coupled, lbr;
    DirParams<T> w;
    const T* x;                     // [B, I]
    T* h;                           // [B, P] in/out
    T* c;                           // [B, H] in/out (LSTM)
    T* work;                        // step_work(job) elements
};

// One Adam / AdamW step of n elements in place (rnncore::adam_update computes the scalars).
template <class T> struct AdamStep {
    int64_t n;
    T* p; const T* g; T* m; T* v;
    T b1, b2, c1, c2, eps, wd, decay, sqrt_bc2, lr_bc1;   // c1 = 1 - b1, c2 = 1 - b2, decay = 1 - lr wd
    int mode;                                              // 0 no decay, 1 L2 (Adam), 2 decoupled (AdamW)
};

template <class T> struct KernelFns {
    void (*gemm)(bool, bool, int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t,
                 T, T*, int64_t);
    void (*dir_forward)(const DirJob<T>&);
    void (*dir_backward)(const DirBackJob<T>&);
    int64_t (*step_work)(const StepJob<T>&);
    void (*step)(const StepJob<T>&);
    // The C++ Model's step at batch 1..B from weights packed once at load (the Model is
    // immutable, so the packed copy cannot go stale). Layout private to this ISA table.
    int64_t (*step_pack_size)(const StepJob<T>&);
    void (*step_pack)(const StepJob<T>&, T* out);
    void (*step_packed)(const StepJob<T>&, const T* packed);
    void (*activations)(int which, int64_t n, const T* x, T* y);   // 0 sigmoid, 1 tanh (tests)
    double (*read_bandwidth)(int64_t bytes, int reps);             // GB/s, calling thread
    void (*adam)(const AdamStep<T>&);
    // Softmax cross-entropy of R rows of C logits z: g = w[r] * (softmax(z_r) - onehot(t[r])),
    // returns sum_r w[r] * (logsumexp(z_r) - z_r[t[r]]); t[r] in [0, C) (checked by the caller).
    double (*softmax_xent)(int64_t R, int64_t C, const T* z, const int64_t* t, const T* w, T* g);
};

struct KernelTable {
    const char* name;
    KernelFns<float> f32;
    KernelFns<double> f64;
};

const KernelTable& active_kernels();
template <class T> const KernelFns<T>& kernels();
template <> inline const KernelFns<float>& kernels<float>() { return active_kernels().f32; }
template <> inline const KernelFns<double>& kernels<double>() { return active_kernels().f64; }

int threads_for_kernels();   // current thread setting (runtime.cpp)
bool amx_active();           // the float32 GEMMs may use AMX (dispatch.cpp; cpu/amx.hpp)
int idle_projection();       // -1 auto, 0 off, 1 on (runtime.cpp; see dir_forward)
void note_idle_projection(); // counts a call that took it (runtime.cpp)
bool spread_projection();    // batch 1: the next block's projection beside the product (runtime.cpp)
void note_spread_projection();
int small_team();            // -1 auto, 0 never, 1 always (runtime.cpp; see dir_forward)
void note_small_team();      // counts a call that ran the team (runtime.cpp)
// A recurrence whose step has fewer multiply-adds (B G H P) runs on one thread: a team's
// per-step exchange would cost more than it shares (rec_threads in cpu/impl.hpp; layer.cpp's
// layer pipeline runs such layers at once instead).
constexpr double TEAM_MIN_MACS = 6.0e4;
// The forward's unpacked path (cpu/impl.hpp): up to SMALL_B batch rows of up to SMALL_T steps
// read the row-major weights in place and project every step first, into DirJob::gates.
// Inference on the packed path projects blocks into per-thread buffers and never touches
// `gates`, so the driver need not size it (layer.cpp: make_job).
constexpr int64_t SMALL_B = 4, SMALL_T = 16;
int64_t l2_cache_bytes();    // one core's L2 as the kernels plan for it (runtime.cpp)

// The exchange pages of a recurrence team of two (cpu/impl.hpp: exchange_claim): one set per
// process, shared by the ISA units (plain data; its functions are the units' own).
struct ExchangeBlock {
    static constexpr int CAND = 64, ROUNDS = 32;
    static constexpr int64_t PAGE = 4096;   // both slots of the ring, or one of up to 1024 floats
    char* cand = nullptr;      // CAND pages
    int state = 0;             // 0 unmeasured, 1 being measured, 2 measured (chosen set, or -1)
    int busy = 0;              // a team is passing h through them
    int chosen[2] = {-1, -1};  // the two fastest candidates
    int64_t uses = 0;          // calls that passed h through them
    int64_t round_trip_ns[CAND] = {};   // per candidate page
};
ExchangeBlock& exchange_block();   // runtime.cpp

// Phases of a recurrence for the opt-in profile (runtime.hpp: phase_timing, phase_times), in
// the order of phase_names().
enum Phase : int {
    PH_FWD_PACK, PH_FWD_PROJ, PH_FWD_PRODUCT, PH_FWD_CELL, PH_FWD_SYNC,
    PH_BWD_PACK, PH_BWD_CELL, PH_BWD_PRODUCT, PH_BWD_SYNC, PH_BWD_WEIGHTS, PH_BWD_INPUT, PH_COUNT
};
bool phase_timing();                                        // RNNCORE_PHASES=1 (read once)
void phase_add(int phase, int tid, int64_t nanoseconds);   // only while phase_timing()

namespace isa_generic { extern const KernelTable table; }
#if defined(RNNCORE_HAVE_X86_KERNELS)
namespace isa_avx2 { extern const KernelTable table; }
namespace isa_avx512 { extern const KernelTable table; }
#endif

}  // namespace rnncore
