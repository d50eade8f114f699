// The layer-stack driver: argument checks, buffers, layers and directions, dropout between
// layers. The per-direction recurrences run in the ISA kernels (cpu/impl.hpp).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.hpp"
#include "rnncore/classic.hpp"
#include "rnncore/layer.hpp"
#include "rnncore/runtime.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rnncore {

namespace {
std::string str(int64_t v) { return std::to_string(v); }
}  // namespace

void LayerSpec::validate() const {
    auto bad = [](const std::string& m) { throw std::invalid_argument(m); };
    if ((int)cell < 0 || (int)cell > 3) bad("cell: expected RNN_TANH, RNN_RELU, LSTM or GRU");
    if (input_size < 1) bad("input_size: expected a positive integer, got " + str(input_size));
    if (hidden_size < 1) bad("hidden_size: expected a positive integer, got " + str(hidden_size));
    if (num_layers < 1) bad("num_layers: expected a positive integer, got " + str(num_layers));
    if (proj_size < 0) bad("proj_size: expected 0 or a positive integer, got " + str(proj_size));
    if (proj_size > 0 && cell != CellType::LSTM) bad("proj_size: only LSTM supports projections");
    if (proj_size >= hidden_size && proj_size > 0)
        bad("proj_size: expected less than hidden_size (" + str(hidden_size) + "), got " + str(proj_size));
    if ((peephole || coupled_gates) && cell != CellType::LSTM)
        bad("peephole/coupled_gates: only LSTM has these variants");
    const int64_t lim = int64_t(1) << 24;
    if (input_size > lim || hidden_size > lim || num_layers > 4096)
        bad("sizes: input_size, hidden_size up to 2^24 and num_layers up to 4096 are supported");
}

std::vector<ParamInfo> param_info(const LayerSpec& spec) {
    spec.validate();
    std::vector<ParamInfo> v;
    const int64_t GH = spec.gates() * spec.hidden_size, H = spec.hidden_size, P = spec.out_size();
    for (int64_t l = 0; l < spec.num_layers; ++l) {
        for (int d = 0; d < spec.dirs(); ++d) {
            const std::string sfx = "_l" + std::to_string(l) + (d ? "_reverse" : "");
            v.push_back({"weight_ih" + sfx, {GH, spec.layer_input_size(l)}, l, d, W_IH});
            v.push_back({"weight_hh" + sfx, {GH, P}, l, d, W_HH});
            if (spec.bias) {
                v.push_back({"bias_ih" + sfx, {GH}, l, d, B_IH});
                v.push_back({"bias_hh" + sfx, {GH}, l, d, B_HH});
            }
            if (spec.proj_size > 0) v.push_back({"weight_hr" + sfx, {P, H}, l, d, W_HR});
        }
    }
    if (spec.peephole) {
        for (int64_t l = 0; l < spec.num_layers; ++l)
            for (int d = 0; d < spec.dirs(); ++d)
                v.push_back({"weight_peep_l" + std::to_string(l) + (d ? "_reverse" : ""), {3, H}, l, d,
                             W_PEEP});
    }
    return v;
}

struct PackedWeights::Impl {
    bool trusted;
    mutable std::mutex mu;
    std::vector<PackSet> sets;   // one per layer direction
    int64_t packs = 0;           // of sets since freed
    void free_all() {
        for (PackSet& ps : sets) {
            packs += ps.packs;
            for (PackSlot& sl : ps.slot) std::free(sl.data);
        }
        sets.clear();
    }
};

PackedWeights::PackedWeights(bool trusted) : impl_(new Impl{trusted, {}, {}, 0}) {}
PackedWeights::~PackedWeights() { impl_->free_all(); }
int64_t PackedWeights::bytes() const {
    std::lock_guard<std::mutex> lk(impl_->mu);
    int64_t n = 0;
    for (const PackSet& ps : impl_->sets)
        for (const PackSlot& sl : ps.slot) n += sl.bytes;
    return n;
}
int64_t PackedWeights::packs() const {
    std::lock_guard<std::mutex> lk(impl_->mu);
    int64_t n = impl_->packs;
    for (const PackSet& ps : impl_->sets) n += ps.packs;
    return n;
}
bool PackedWeights::trusted() const { return impl_->trusted; }
void PackedWeights::clear() {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->free_all();
}

template <class T> struct StackCache {
    LayerSpec spec;
    int64_t steps = 0, batch = 0;
    std::vector<int64_t> lengths;             // empty: every sequence has T steps
    std::vector<std::vector<T>> inputs;       // per layer [T, B, I_k] (after dropout)
    std::vector<std::vector<T>> masks;        // L-1 dropout masks [T, B, D*P]
    struct Dir {
        std::vector<T> gates, hbuf, cbuf, mbuf, extra;
        int gate_team = 0;                    // layout of `gates` (DirJob::gate_team)
    };
    std::vector<Dir> dirs;                    // L*D
    uint64_t epoch = 0;                       // release_memory()'s count when it was taken
};

template <class T> int64_t cache_steps(const StackCache<T>& c) { return c.steps; }

namespace {
// The buffers a thread keeps from call to call, so that repeated calls fault in and zero no
// new pages: one spare training cache (a cache released after backward keeps its buffers here
// for the next forward), inference's activations and outputs, and the backward's gradient
// buffers. Each group is trimmed to its last call's sizes once TRIM_AFTER calls in a row have
// used less than a quarter of what it keeps (and it keeps at least TRIM_MIN_BYTES): a
// one-off large call does not hold its memory for good, while calls that alternate between
// sizes (the layers of a model, batches of varying size) keep theirs. release_memory() drops
// them all: the calling thread's at once, every other thread's at the start of its next call
// (KeptScope).
std::atomic<uint64_t> kept_epoch{0};
constexpr int64_t TRIM_MIN_BYTES = int64_t(16) << 20;
constexpr int TRIM_AFTER = 8;

template <class Dir, class F> void each_dir_buffer(Dir& d, F&& f) {
    f(d.gates); f(d.hbuf); f(d.cbuf); f(d.mbuf); f(d.extra);
}
template <class T, class F> void each_buffer(StackCache<T>& c, F&& f) {
    for (auto& v : c.inputs) f(v);
    for (auto& v : c.masks) f(v);
    for (auto& d : c.dirs) each_dir_buffer(d, f);
}
// Counts a group's calls that used under a quarter of its buffers' capacity; at TRIM_AFTER in a
// row, shrinks each buffer to its size (what the last call used). each(f) visits the buffers.
// With `touched` (the buffers the last call noted as its own: note_used), a buffer not among
// them counts as unused and is freed when the group is trimmed: one of a path the calls no
// longer take (the layer pipeline's against the plain order's) is not kept for good.
template <class T, class Each>
void settle(Each&& each, int& small, const std::vector<const std::vector<T>*>* touched = nullptr) {
    auto in_use = [&](const std::vector<T>& v) {
        return !touched || std::find(touched->begin(), touched->end(), &v) != touched->end();
    };
    int64_t used = 0, cap = 0;
    each([&](std::vector<T>& v) {
        used += in_use(v) ? (int64_t)(v.size() * sizeof(T)) : 0;
        cap += (int64_t)(v.capacity() * sizeof(T));
    });
    if (cap < TRIM_MIN_BYTES || 4 * used >= cap) {
        small = 0;
        return;
    }
    if (++small < TRIM_AFTER) return;
    small = 0;
    each([&](std::vector<T>& v) {
        if (in_use(v)) v.shrink_to_fit();
        else std::vector<T>().swap(v);
    });
}

template <class T> struct ThreadKept {
    std::unique_ptr<StackCache<T>> spare;
    std::shared_ptr<StackCache<T>> pool;                 // inference
    std::vector<T> pool_y[2];
    std::vector<std::vector<T>> pipe_y;
    std::vector<T> dgx, dgh, dhs, dlayer[2];             // backward, layer by layer
    std::vector<std::vector<T>> pdgx, pdgh, pdhs, pdx, pdh, pdc;   // the backward pipeline
    uint64_t epoch = 0;                                  // of release_memory() last seen
    int depth = 0;                                       // calls of this thread in progress
    int small[3] = {0, 0, 0};                            // settle's counts: inference, backward, spare
    std::vector<const std::vector<T>*> touched;          // buffers of the outermost call in progress
    template <class F> void each_infer(F&& f) {
        if (pool) each_buffer(*pool, f);
        f(pool_y[0]); f(pool_y[1]);
        for (auto& v : pipe_y) f(v);
    }
    template <class F> void each_back(F&& f) {
        f(dgx); f(dgh); f(dhs); f(dlayer[0]); f(dlayer[1]);
        for (auto* x : {&pdgx, &pdgh, &pdhs, &pdx, &pdh, &pdc})
            for (auto& v : *x) f(v);
    }
    int64_t bytes() {
        int64_t n = 0;
        auto add = [&](std::vector<T>& v) { n += (int64_t)(v.capacity() * sizeof(T)); };
        if (spare) each_buffer(*spare, add);
        each_infer(add);
        each_back(add);
        return n;
    }
    // Frees every buffer (a fresh set, the calls in progress counted as before) and notes
    // release_memory()'s count e as seen.
    void release(uint64_t e) {
        const int d = depth;
        *this = ThreadKept();
        depth = d;
        epoch = e;
    }
};
template <class T> ThreadKept<T>& thread_kept() {
    thread_local ThreadKept<T> k;
    return k;
}
enum class KeptUse { none, inference, backward };
// For the span of a call that uses the kept buffers: at the outermost such call, first drops
// them if release_memory() came since this thread last looked (none of them is in use then),
// and at its end settles the group it used.
template <class T> struct KeptScope {
    ThreadKept<T>& k;
    KeptUse use;
    explicit KeptScope(KeptUse u) : k(thread_kept<T>()), use(u) {
        const uint64_t e = kept_epoch.load(std::memory_order_acquire);
        if (k.depth++ == 0) {
            k.touched.clear();
            if (k.epoch != e) k.release(e);
        }
    }
    ~KeptScope() {
        if (--k.depth > 0) return;
        if (use == KeptUse::inference) settle<T>([&](auto&& f) { k.each_infer(f); }, k.small[0], &k.touched);
        if (use == KeptUse::backward) settle<T>([&](auto&& f) { k.each_back(f); }, k.small[1], &k.touched);
    }
    // Notes a buffer as one this call uses (settle), on the calling thread.
    void note_used(std::vector<T>& v) { k.touched.push_back(&v); }
    template <class Dir> void note_dir(Dir& d) {
        each_dir_buffer(d, [&](std::vector<T>& v) { note_used(v); });
    }
    KeptScope(const KeptScope&) = delete;
    KeptScope& operator=(const KeptScope&) = delete;
};

template <class T> std::shared_ptr<StackCache<T>> take_cache() {
    std::unique_ptr<StackCache<T>>& slot = thread_kept<T>().spare;
    StackCache<T>* raw = slot ? slot.release() : new StackCache<T>();
    raw->epoch = kept_epoch.load(std::memory_order_acquire);
    return std::shared_ptr<StackCache<T>>(raw, [](StackCache<T>* p) {
        // back to the releasing thread's spare slot, unless release_memory() came since it
        // was taken or that thread holds a spare already
        ThreadKept<T>& k = thread_kept<T>();
        if (!k.spare && p->epoch == kept_epoch.load(std::memory_order_acquire)) {
            settle<T>([&](auto&& f) { each_buffer(*p, f); }, k.small[2]);
            k.spare.reset(p);
        } else {
            delete p;
        }
    });
}
}  // namespace

void release_memory() {
    const uint64_t e = kept_epoch.fetch_add(1, std::memory_order_acq_rel) + 1;
    // this thread's now, unless one of its calls is in progress (then at its next call)
    if (thread_kept<float>().depth == 0) thread_kept<float>().release(e);
    if (thread_kept<double>().depth == 0) thread_kept<double>().release(e);
}

int64_t kept_memory_bytes() { return thread_kept<float>().bytes() + thread_kept<double>().bytes(); }

template <class T> int64_t cache_batch(const StackCache<T>& c) { return c.batch; }

namespace {

template <class T>
DirJob<T> make_job(const LayerSpec& s, int64_t layer, int d, int64_t TT, int64_t B,
                   const int64_t* lengths, const DirParams<T>& w, const T* x,
                   typename StackCache<T>::Dir& buf, T* y, bool infer = false) {
    const int64_t H = s.hidden_size, P = s.out_size(), GH = s.gates() * H;
    DirJob<T> j{};
    j.cell = (int)s.cell;
    j.steps = TT; j.batch = B; j.in = s.layer_input_size(layer); j.hid = H; j.out = P;
    j.peephole = s.peephole; j.coupled = s.coupled_gates; j.lbr = s.linear_before_reset;
    j.reverse = d == 1;
    j.lengths = lengths;
    j.w = w;
    j.x = x;
    // Inference needs the [T, B, G*H] gate array only on the unpacked path (kernels.hpp):
    // elsewhere it is neither sized nor zeroed (T=100 B=64 H=512 LSTM: 52 MB a thread).
    if (!infer || (B <= SMALL_B && TT <= SMALL_T)) buf.gates.resize(TT * B * GH);
    // Inference keeps the state of two steps (j.ring: kernels.hpp), not of every step.
    j.ring = infer;
    const int64_t slots = infer ? 2 : TT + 1, rows = infer ? 1 : TT;
    buf.hbuf.resize(slots * B * P);
    if (s.is_lstm()) buf.cbuf.resize(slots * B * H);
    if (s.is_lstm() && P != H) buf.mbuf.resize(rows * B * H);
    if (s.cell == CellType::GRU) buf.extra.resize(rows * B * H);
    j.gates = buf.gates.empty() ? nullptr : buf.gates.data();
    j.gate_team = &buf.gate_team;
    j.hbuf = buf.hbuf.data();
    j.cbuf = buf.cbuf.empty() ? nullptr : buf.cbuf.data();
    j.mbuf = buf.mbuf.empty() ? nullptr : buf.mbuf.data();
    j.extra = buf.extra.empty() ? nullptr : buf.extra.data();
    j.y = y ? y + d * P : nullptr;
    j.ldy = s.dirs() * P;
    return j;
}

// Inference of a bidirectional layer runs its two directions at once, each on its own share of
// the threads, when that share is whole: with two or three threads one each (no per-step
// barrier, each core streams one direction's weights), with more only where nested parallel
// regions are enabled (otherwise a direction's team would shrink to one thread). Returns the
// threads per direction, or 0: one direction after the other, each with every thread. Calls
// under ~1e5 multiply-adds keep the old order (a parallel region costs microseconds, as for
// the streaming step). Measured on two Zen 3 cores (inference, frozen layers, one direction
// after the other against both at once, three alternating rounds): T=100 B=1 I=128 H=256 LSTM
// 2.02-2.38 -> 1.73-2.09 ms, GRU 1.51-1.71 -> 1.24-1.40, RNN 0.46-0.67 -> 0.39-0.47; B=16
// LSTM 15.9-17.7 -> 15.2; T=50 B=1 I=H=512 LSTM 4.9-5.9 -> 4.6-5.1; T=100 B=64 I=256 H=512
// GRU 177-181 -> 166-177.
int concurrent_dir_threads(const LayerSpec& s, int64_t layer, int64_t TT, int64_t B, int elem_bytes) {
#ifdef _OPENMP
    constexpr double CONCURRENT_DIRS_MIN_MACS = 1.0e5;
    if (!s.bidirectional || omp_in_parallel()) return 0;
    const int n = threads_for_kernels();
    const double macs = 2.0 * (double)TT * B * s.gates() * s.hidden_size *
                        (double)(s.layer_input_size(layer) + s.out_size());
    if (n < 2 || macs < CONCURRENT_DIRS_MIN_MACS) return 0;
    // Each direction's recurrent weights are read at every step: two directions at once keep
    // both sets in the cache at the same time (one after the other, each core holds half of
    // one set), so only where both fit in a share of the L3 (LSTM I=H=1024, 32 MB of W_hh:
    // 10.8 -> 17-19 ms at T=25 on a 32 MB L3 shared with other tenants). A fixed 8 MiB: the
    // L3 size the OS reports may be the whole package's (256 MB on that machine's KVM guest).
    const double budget = 8.0 * (1 << 20);
    const double wbytes = 2.0 * elem_bytes * ((double)s.gates() * s.hidden_size * s.out_size() +
                                              (s.proj_size > 0 ? (double)s.proj_size * s.hidden_size : 0.0));
    if (wbytes > budget) return 0;
    if (n < 4) return 1;
    return omp_get_max_active_levels() >= 2 ? n / 2 : 0;
#else
    (void)s; (void)layer; (void)TT; (void)B; (void)elem_bytes;
    return 0;
#endif
}

// A stack of unidirectional layers runs its layers at once, one thread a layer (the layer
// pipeline): a layer projects a block of its input rows as soon as the layer below has
// written them (the jobs' x_ready / y_ready counts of steps), so the layers' time loops
// overlap instead of running one after the other, each with every thread. Where a
// layer's recurrence would run on one thread anyway (a step under TEAM_MIN_MACS
// multiply-adds) the other cores were idle; where every layer's weights fit in half of one
// core's L2, one core streams a whole layer's W_hh from its L2 with no per-step exchange
// between the cores. Measured on two AVX-512 Xeon cores, two layers, T=100, inference, us,
// layer by layer / pipelined: B=1 LSTM I=32 H=64 145 / 95, GRU I=64 H=128 437 / 254, RNN
// 129 / 85; LSTM B=4 I=H=64 434 / 261, B=1 I=H=128 404 / 345, B=16 3967 / 3265, B=1 I=H=176
// (1 MiB a layer) 756 / 690, B=8 3454 / 3025; GRU I=H=200 777 / 687; RNN I=H=362 796 / 746.
// Not where a layer's weights exceed that (the team's halves then stay in the L2s, one
// core's whole layer does not): B=1 LSTM I=128 H=256 (2 MiB) 1285 / 1476, GRU (1.5 MiB) 967 /
// 1049, RNN I=256 H=512 1341 / 1854; GRU B=16 I=128 H=256 8520 / 9025. Layer l runs on thread
// l mod n, so with fewer threads than layers a thread runs its layers in order; a layer only
// waits for the one below it, which never waits for a layer above: the wavefront always
// moves. Sequences shorter than 32 steps keep the layer-by-layer order (the wait
// for the first block would be much of the call). Training's forward too: a layer writes its
// output straight into the next layer's kept input, times that layer's dropout mask (the
// job's ymask), and its gate activations row-major (a team of one in time order), which the
// backward's team reads as they are. Two layers, T=100, training step (forward + backward),
// one process, the forward pipelined against the layer-by-layer build (new/old; the backward
// as before): B=1 LSTM I=32 H=64 0.87 (three layers 0.87, dropout 0.2 0.87), GRU I=64 H=128
// 0.85, RNN 0.85, LSTM 0.98; B=16 LSTM I=H=128 0.91, GRU I=64 H=128 0.91 (dropout 0.2 0.84);
// B=64 LSTM I=32 H=64 0.82.
// Returns the threads, or 0: layer by layer.
int64_t pipeline_runs = 0, backward_pipeline_runs = 0;   // __atomic builtins
#ifdef _OPENMP
// The threads for a pipeline of the stack's layers, or 0 where it cannot take one.
int stack_pipeline_base(const LayerSpec& s, int64_t TT) {
    constexpr int64_t PIPELINE_MIN_STEPS = 32;
    if (s.num_layers < 2 || s.bidirectional || TT < PIPELINE_MIN_STEPS || omp_in_parallel()) return 0;
    const int n = threads_for_kernels();
    return n < 2 ? 0 : n;
}
#endif
int pipeline_threads(const LayerSpec& s, int64_t TT, int64_t B, int elem_bytes) {
#ifdef _OPENMP
    const int n = stack_pipeline_base(s, TT);
    if (n == 0) return 0;
    const double H = (double)s.hidden_size, P = (double)s.out_size(), G = s.gates();
    bool fits = true;
    for (int64_t l = 0; l < s.num_layers; ++l) {
        const double w = elem_bytes * (G * H * ((double)s.layer_input_size(l) + P) + (s.proj_size > 0 ? P * H : 0.0));
        if (w > 0.5 * (double)l2_cache_bytes()) fits = false;
    }
    // (With more threads than layers the layers' teams would share the slices among more
    // cores than the pipeline's one a layer: measured on two cores only, so there only the
    // layers that run on one thread anyway.)
    if ((!fits || n > s.num_layers) && (double)B * G * H * P >= TEAM_MIN_MACS) return 0;
    return n < s.num_layers ? n : (int)s.num_layers;
#else
    (void)s; (void)TT; (void)B; (void)elem_bytes;
    return 0;
#endif
}

// The backward of such a stack runs its layers at once too, one thread a layer, where each
// layer's recurrence runs on one thread anyway (a step under TEAM_MIN_MACS multiply-adds) or,
// at up to SMALL_B batch rows, where the forward pipelines (a layer's team of two then meets at
// a barrier every step; with more rows a layer's backward gives the recurrence to one core and
// the weight gradients of its finished steps to the other, which was faster: B=16 LSTM I=H=128
// 10.7 ms layer by layer against 11.9 pipelined, GRU I=64 H=128 7.6 / 7.7, B=64 LSTM I=32 H=64
// 11.5 / 12.4; at B=4 LSTM I=32 H=64 1.21 / 0.73, B=1 LSTM I=64 H=128 1.14 / 0.99). Layer l
// runs on thread (L - 1 - l) mod n from the top layer down and computes its dx (the dy of the
// layer below, times that layer's dropout mask) a block of steps at a time as its time loop
// finishes them, which the layer below waits for (the jobs' dx_ready / dy_ready counts of
// steps from the last); each thread then takes its layers' weight gradients.
int backward_pipeline_threads(const LayerSpec& s, int64_t TT, int64_t B, int elem_bytes) {
#ifdef _OPENMP
    const int n = stack_pipeline_base(s, TT);
    if (n == 0) return 0;
    if ((double)B * s.gates() * s.hidden_size * s.out_size() >= TEAM_MIN_MACS &&
        (B > SMALL_B || pipeline_threads(s, TT, B, elem_bytes) == 0))
        return 0;
    return n < s.num_layers ? n : (int)s.num_layers;
#else
    (void)s; (void)TT; (void)B; (void)elem_bytes;
    return 0;
#endif
}

// run(l) for each of a pipeline's L layers, layer k (from the bottom, or from the top with
// top_down) on thread k mod n. A layer that throws publishes all its steps (release(l)) so that
// the layers waiting on it run on and end (their results are discarded); the first exception
// is rethrown after the region. Without OpenMP the layers run in that order on the caller.
template <class Run, class Release>
void run_layers(int64_t L, int threads, bool top_down, Run&& run, Release&& release) {
    std::vector<std::exception_ptr> err(L);
    auto one = [&](int64_t k) {
        const int64_t l = top_down ? L - 1 - k : k;
        try {
            run(l);
        } catch (...) {
            err[l] = std::current_exception();
            release(l);
        }
    };
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    for (int64_t k = omp_get_thread_num(); k < L; k += omp_get_num_threads()) one(k);
#else
    (void)threads;
    for (int64_t k = 0; k < L; ++k) one(k);
#endif
    for (const std::exception_ptr& e : err)
        if (e) std::rethrow_exception(e);
}
struct alignas(64) Ready { int64_t v; };   // a layer's count of published steps, on its own line

}  // namespace

int64_t layer_pipeline_runs() { return __atomic_load_n(&pipeline_runs, __ATOMIC_RELAXED); }
int64_t layer_pipeline_backward_runs() { return __atomic_load_n(&backward_pipeline_runs, __ATOMIC_RELAXED); }

namespace {
template <class T> void check_params(const LayerSpec& s, const std::vector<DirParams<T>>& p) {
    if ((int64_t)p.size() != s.num_layers * s.dirs())
        throw std::invalid_argument("params: expected " + str(s.num_layers * s.dirs()) +
                                    " layer-direction entries, got " + str((int64_t)p.size()));
    for (const auto& w : p) {
        if (!w.w_ih || !w.w_hh) throw std::invalid_argument("params: missing weight_ih/weight_hh");
        if (s.bias && (!w.b_ih || !w.b_hh)) throw std::invalid_argument("params: missing bias_ih/bias_hh");
        if (s.proj_size > 0 && !w.w_hr) throw std::invalid_argument("params: missing weight_hr");
        if (s.peephole && !w.w_peep) throw std::invalid_argument("params: missing weight_peep");
    }
}

}  // namespace

template <class T>
void stack_forward(const LayerSpec& s, const std::vector<DirParams<T>>& params,
                   const ForwardArgs<T>& a, const ForwardOut<T>& out,
                   std::shared_ptr<StackCache<T>>* cache) {
    s.validate();
    check_params(s, params);
    const int64_t TT = a.steps, B = a.batch, D = s.dirs(), L = s.num_layers;
    const int64_t H = s.hidden_size, P = s.out_size();
    if (TT < 1) throw std::invalid_argument("x: expected at least one time step, got " + str(TT));
    if (B < 1) throw std::invalid_argument("x: expected a batch of at least 1, got " + str(B));
    if (!a.x || !out.y || !out.h_n || (s.is_lstm() && !out.c_n))
        throw std::invalid_argument("stack_forward: null input or output buffer");
    if (a.lengths) {
        for (int64_t b = 0; b < B; ++b)
            if (a.lengths[b] < 1 || a.lengths[b] > TT)
                throw std::invalid_argument("lengths: expected values in [1, " + str(TT) + "], got " +
                                            str(a.lengths[b]) + " at index " + str(b));
    }
    const bool keep = cache != nullptr;
    const bool bf16 = a.recurrent_precision == Precision::BFloat16;
    if (a.recurrent_precision != Precision::Float32 && !bf16)
        throw std::invalid_argument("recurrent_precision: expected Float32 or BFloat16, got " +
                                    str((int)a.recurrent_precision));
    if (bf16 && sizeof(T) != sizeof(float))
        throw std::invalid_argument("recurrent_precision: bfloat16 recurrent weights need a float32 "
                                    "layer, got float64");
    if (bf16 && keep)
        throw std::invalid_argument("recurrent_precision: bfloat16 recurrent weights are for "
                                    "inference; training (a forward that keeps its activations) "
                                    "runs in float32");
    // Training keeps its activations in a cache of its own. Inference reuses this thread's
    // buffers from call to call: after the first call of a size no page is faulted in or
    // zeroed again (the buffers stay allocated for the thread: ThreadKept).
    std::shared_ptr<StackCache<T>> c;
    KeptScope<T> kept(keep ? KeptUse::none : KeptUse::inference);
    std::shared_ptr<StackCache<T>>& pool = kept.k.pool;
    std::vector<T>* pool_y = kept.k.pool_y;
    std::vector<T> own_y[2];
    if (keep) {
        c = take_cache<T>();
        c->masks.clear();
    } else {
        if (!pool) pool = std::make_shared<StackCache<T>>();
        c = pool;
        c->masks.clear();
    }
    std::vector<T>* ybuf = keep ? own_y : pool_y;
    c->spec = s; c->steps = TT; c->batch = B;
    c->lengths.clear();
    if (a.lengths) c->lengths.assign(a.lengths, a.lengths + B);
    const int64_t* lens = a.lengths ? c->lengths.data() : nullptr;
    c->inputs.resize(L);
    // inference: one set of buffers per direction (both may run at once); never shrunk
    if (keep) c->dirs.resize(L * D);
    else if ((int64_t)c->dirs.size() < D) c->dirs.resize(D);

    // Kept packed weights, when given and not in use by another call.
    std::unique_lock<std::mutex> packed_lock;
    std::vector<PackSet>* packed = nullptr;
    if (a.packed) {
        PackedWeights::Impl& pw = a.packed->impl();
        packed_lock = std::unique_lock<std::mutex>(pw.mu, std::try_to_lock);
        if (packed_lock.owns_lock()) {
            if ((int64_t)pw.sets.size() != L * D) {
                pw.free_all();
                PackSet empty{};
                empty.trusted = pw.trusted;
                pw.sets.assign(L * D, empty);
            }
            packed = &pw.sets;
        }
    }

    // The job of direction d of layer l with the call's settings and its entering state set,
    // and the copy of its final state out (both orders below).
    auto prepare = [&](int64_t l, int d, const T* in, typename StackCache<T>::Dir& buf, T* y, int max_threads) {
        const int64_t idx = l * D + d;
        DirJob<T> j = make_job(s, l, d, TT, B, lens, params[idx], in, buf, y, !keep);
        j.packed = packed ? &(*packed)[idx] : nullptr;
        j.zero_start = a.h0 == nullptr;
        j.infer = !keep;
        j.bf16 = bf16;
        j.max_threads = max_threads;
        const int rev = d == 1;
        const int64_t in_slot = rev ? (j.ring ? TT & 1 : TT) : 0;
        T* h_in = j.hbuf + in_slot * B * P;
        if (a.h0) std::memcpy(h_in, a.h0 + idx * B * P, sizeof(T) * B * P);
        else std::fill(h_in, h_in + B * P, T(0));
        if (s.is_lstm()) {
            T* c_in = j.cbuf + in_slot * B * H;
            if (a.c0) std::memcpy(c_in, a.c0 + idx * B * H, sizeof(T) * B * H);
            else std::fill(c_in, c_in + B * H, T(0));
        }
        return j;
    };
    auto finish = [&](const DirJob<T>& j, int64_t l, int d) {
        const int64_t idx = l * D + d;
        const int rev = d == 1;
        const int64_t out_slot = rev ? 0 : (j.ring ? TT & 1 : TT);
        std::memcpy(out.h_n + idx * B * P, j.hbuf + out_slot * B * P, sizeof(T) * B * P);
        if (s.is_lstm())
            std::memcpy(out.c_n + idx * B * H, j.cbuf + out_slot * B * H, sizeof(T) * B * H);
    };

    const int pipe = pipeline_threads(s, TT, B, (int)sizeof(T));
    if (pipe > 0) {
        // Every buffer is sized before the region (nothing is allocated while layers wait on
        // each other): a set of job buffers and an output per layer. Training writes each
        // layer's output straight into the next layer's kept input.
        std::vector<std::vector<T>>& pipe_y = kept.k.pipe_y;
        std::vector<std::vector<T>>& ins = keep ? c->inputs : pipe_y;
        if (keep) c->inputs[0].assign(a.x, a.x + TT * B * s.input_size);
        else if ((int64_t)pipe_y.size() < L - 1) pipe_y.resize(L - 1);
        auto layer_in = [&](int64_t l) -> std::vector<T>& { return ins[keep ? l : l - 1]; };   // l >= 1
        if ((int64_t)c->dirs.size() < L) c->dirs.resize(L);
        std::vector<Ready> ready(L);
        std::vector<DirJob<T>> jobs(L);
        for (int64_t l = 0; l < L; ++l) {
            T* y = out.y;
            if (l < L - 1) {
                layer_in(l + 1).resize(TT * B * P);
                kept.note_used(layer_in(l + 1));
                y = layer_in(l + 1).data();
            }
            kept.note_dir(c->dirs[l]);
            const T* in = l > 0 ? layer_in(l).data() : keep ? c->inputs[0].data() : a.x;
            DirJob<T>& j = jobs[l] = prepare(l, 0, in, c->dirs[l], y, 1);
            if (a.dropout_masks && l < L - 1) {   // the next layer's input: y times its mask
                j.ymask = a.dropout_masks[l];
                if (keep) c->masks.emplace_back(j.ymask, j.ymask + TT * B * P);
            }
            ready[l].v = 0;
            j.x_ready = l > 0 ? &ready[l - 1].v : nullptr;
            j.y_ready = &ready[l].v;
        }
        __atomic_add_fetch(&pipeline_runs, 1, __ATOMIC_RELAXED);
        run_layers(L, pipe, false, [&](int64_t l) { kernels<T>().dir_forward(jobs[l]); },
                   [&](int64_t l) { __atomic_store_n(&ready[l].v, TT, __ATOMIC_RELEASE); });
        for (int64_t l = 0; l < L; ++l) finish(jobs[l], l, 0);
        if (keep) *cache = c;
        return;
    }

    const T* layer_in = a.x;
    if (keep) {
        c->inputs[0].assign(a.x, a.x + TT * B * s.input_size);
        layer_in = c->inputs[0].data();
    }
    for (int64_t l = 0; l < L; ++l) {
        if (l > 0) {
            const std::vector<T>& prev = ybuf[(l - 1) & 1];
            std::vector<T>& in = c->inputs[l];
            if (a.dropout_masks) {
                const T* m = a.dropout_masks[l - 1];
                in.resize(prev.size());
                kept.note_used(in);
                for (size_t i = 0; i < prev.size(); ++i) in[i] = prev[i] * m[i];
                if (keep) c->masks.emplace_back(m, m + prev.size());
                layer_in = in.data();
            } else if (keep) {
                in = prev;
                layer_in = in.data();
            } else {
                layer_in = prev.data();
            }
        }
        T* y = out.y;
        if (l < L - 1) {
            ybuf[l & 1].resize(TT * B * D * P);
            kept.note_used(ybuf[l & 1]);
            y = ybuf[l & 1].data();
        }
        for (int d = 0; d < D; ++d) kept.note_dir(c->dirs[keep ? l * D + d : d]);
        const int per_dir = keep ? 0 : concurrent_dir_threads(s, l, TT, B, bf16 ? 2 : (int)sizeof(T));
        auto run_dir = [&](int d) {
            const DirJob<T> j = prepare(l, d, layer_in, c->dirs[keep ? l * D + d : d], y, per_dir);
            kernels<T>().dir_forward(j);
            finish(j, l, d);
        };
        if (per_dir > 0) {
#ifdef _OPENMP
            // both directions at once; an exception may not leave the parallel region
            std::exception_ptr err[2];
#pragma omp parallel num_threads(2)
            for (int d = omp_get_thread_num(); d < 2; d += omp_get_num_threads()) {
                try {
                    run_dir(d);
                } catch (...) {
                    err[d] = std::current_exception();
                }
            }
            for (const std::exception_ptr& e : err)
                if (e) std::rethrow_exception(e);
#endif
        } else {
            for (int d = 0; d < D; ++d) run_dir(d);
        }
    }
    if (keep) *cache = c;
}

template <class T>
void stack_backward(const LayerSpec& s, const std::vector<DirParams<T>>& params,
                    const StackCache<T>& c, const BackwardArgs<T>& a, const BackwardOut<T>& out,
                    const std::vector<DirGrads<T>>& grads) {
    s.validate();
    check_params(s, params);
    const int64_t TT = c.steps, B = c.batch, D = s.dirs(), L = s.num_layers;
    const int64_t H = s.hidden_size, P = s.out_size(), GH = s.gates() * H;
    if ((int64_t)grads.size() != L * D)
        throw std::invalid_argument("grads: expected " + str(L * D) + " entries");
    if ((int64_t)c.dirs.size() != L * D || (int64_t)c.inputs.size() != L)
        throw std::invalid_argument("backward: the cached forward pass does not match this layer");
    if (!out.dh0 || (s.is_lstm() && !out.dc0))   // (out.dx null: no input gradient)
        throw std::invalid_argument("stack_backward: null output buffer");
    const int64_t* lens = c.lengths.empty() ? nullptr : c.lengths.data();

    // Per-thread scratch reused from call to call (every element is written before it is read).
    KeptScope<T> kept(KeptUse::backward);
    std::vector<T> &dgx = kept.k.dgx, &dgh = kept.k.dgh, &dhs = kept.k.dhs, *dlayer = kept.k.dlayer;
    std::vector<T> dh(B * P), dc(s.is_lstm() ? B * H : 1);
    // Rows of the gate gradients a multiple of 1 KB apart would put the rows that a per-step
    // product reads together (the A operand of dh = dG @ W_hh) in the same few L1 sets: one
    // cache line of padding (LSTM T=100 B=16 H=256 training 15.76 -> 15.38 ms; B=64 H=512
    // 234.9 -> 233.1).
    const int64_t LD = GH * (int64_t)sizeof(T) % 1024 == 0 ? GH + 64 / (int64_t)sizeof(T) : GH;
    const bool use_dgh = s.cell == CellType::GRU && s.linear_before_reset;
    const bool use_dhs = s.is_lstm() && P != H;
    // The job of direction d of layer l (its dh and dc set from the call's final-state gradients).
    auto prepare = [&](int64_t l, int d, T* dhp, T* dcp, T* dgxp, T* dghp, T* dhsp, const T* dyp, T* dx) {
        const int64_t idx = l * D + d;
        auto& buf = const_cast<typename StackCache<T>::Dir&>(c.dirs[idx]);
        DirBackJob<T> bj{};
        bj.f = make_job(s, l, d, TT, B, lens, params[idx], c.inputs[l].data(), buf, (T*)nullptr);
        bj.dy = dyp ? dyp + d * P : nullptr;
        bj.ldy = D * P;
        if (a.dh_n) std::memcpy(dhp, a.dh_n + idx * B * P, sizeof(T) * B * P);
        else std::fill(dhp, dhp + B * P, T(0));
        if (s.is_lstm()) {
            if (a.dc_n) std::memcpy(dcp, a.dc_n + idx * B * H, sizeof(T) * B * H);
            else std::fill(dcp, dcp + B * H, T(0));
        }
        bj.dh = dhp;
        bj.dc = dcp;
        bj.dgx = dgxp;
        bj.ldg = LD;
        bj.dgh = use_dgh ? dghp : nullptr;
        bj.dhs = use_dhs ? dhsp : nullptr;
        bj.g = grads[idx];
        bj.dx = dx;
        bj.dx_accumulate = d > 0;
        return bj;
    };
    auto finish = [&](const DirBackJob<T>& bj, int64_t l, int d) {
        const int64_t idx = l * D + d;
        std::memcpy(out.dh0 + idx * B * P, bj.dh, sizeof(T) * B * P);
        if (s.is_lstm()) std::memcpy(out.dc0 + idx * B * H, bj.dc, sizeof(T) * B * H);
    };

    const int pipe = backward_pipeline_threads(s, TT, B, (int)sizeof(T));
    if (pipe > 0) {
        // Every buffer sized before the region: per layer its gradient buffers, its dh and dc,
        // and (above layer 0) its dx, the dy of the layer below.
        std::vector<std::vector<T>> &pdgx = kept.k.pdgx, &pdgh = kept.k.pdgh, &pdhs = kept.k.pdhs,
                                    &pdx = kept.k.pdx, &pdh = kept.k.pdh, &pdc = kept.k.pdc;
        for (auto* v : {&pdgx, &pdgh, &pdhs, &pdx, &pdh, &pdc})
            if ((int64_t)v->size() < L) v->resize(L);
        std::vector<Ready> ready(L);
        std::vector<DirBackJob<T>> jobs(L);
        for (int64_t l = 0; l < L; ++l) {
            pdgx[l].resize(TT * B * LD);
            if (use_dgh) pdgh[l].resize(TT * B * LD);
            if (use_dhs) pdhs[l].resize(TT * B * P);
            pdh[l].resize(B * P);
            pdc[l].resize(s.is_lstm() ? B * H : 1);
            if (l > 0) pdx[l].resize(TT * B * s.layer_input_size(l));
            kept.note_used(pdgx[l]);
            kept.note_used(pdh[l]);
            kept.note_used(pdc[l]);
            if (use_dgh) kept.note_used(pdgh[l]);
            if (use_dhs) kept.note_used(pdhs[l]);
            if (l > 0) kept.note_used(pdx[l]);
        }
        for (int64_t l = 0; l < L; ++l) {
            DirBackJob<T>& bj = jobs[l] = prepare(l, 0, pdh[l].data(), pdc[l].data(), pdgx[l].data(), pdgh[l].data(),
                                                  pdhs[l].data(), l == L - 1 ? a.dy : pdx[l + 1].data(),
                                                  l > 0 ? pdx[l].data() : out.dx);
            ready[l].v = 0;
            bj.dy_ready = l < L - 1 ? &ready[l + 1].v : nullptr;
            bj.dx_ready = l > 0 ? &ready[l].v : nullptr;
            bj.dx_mask = l > 0 && !c.masks.empty() ? c.masks[l - 1].data() : nullptr;
            bj.f.max_threads = 1;
        }
        __atomic_add_fetch(&backward_pipeline_runs, 1, __ATOMIC_RELAXED);
        run_layers(L, pipe, true, [&](int64_t l) { kernels<T>().dir_backward(jobs[l]); },
                   [&](int64_t l) { __atomic_store_n(&ready[l].v, TT, __ATOMIC_RELEASE); });
        for (int64_t l = 0; l < L; ++l) finish(jobs[l], l, 0);
        return;
    }

    dgx.resize(TT * B * LD);
    if (use_dgh) dgh.resize(TT * B * LD);
    if (use_dhs) dhs.resize(TT * B * P);
    kept.note_used(dgx);
    if (use_dgh) kept.note_used(dgh);
    if (use_dhs) kept.note_used(dhs);
    const T* dy = a.dy;
    for (int64_t l = L - 1; l >= 0; --l) {
        const int64_t In = s.layer_input_size(l);
        T* dx = out.dx;
        if (l > 0) {
            dlayer[l & 1].resize(TT * B * In);
            kept.note_used(dlayer[l & 1]);
            dx = dlayer[l & 1].data();
        }
        for (int d = 0; d < D; ++d) {
            const DirBackJob<T> bj = prepare(l, d, dh.data(), dc.data(), dgx.data(), dgh.data(), dhs.data(), dy, dx);
            kernels<T>().dir_backward(bj);
            finish(bj, l, d);
        }
        if (l > 0) {
            std::vector<T>& dprev = dlayer[l & 1];
            if (!c.masks.empty()) {
                const std::vector<T>& m = c.masks[l - 1];
                for (size_t i = 0; i < dprev.size(); ++i) dprev[i] *= m[i];
            }
            dy = dprev.data();
        }
    }
}

template <class T>
void stack_step(const LayerSpec& s, const std::vector<DirParams<T>>& params, int64_t B,
                const T* x, T* h, T* c, T* y, Precision precision, PackedWeights* packed) {
    if (precision == Precision::Float32) return stack_step<T>(s, params, B, x, h, c, y);
    if (s.bidirectional)
        throw std::invalid_argument("step: a bidirectional layer needs the whole sequence");
    if (!h || (s.is_lstm() && !c)) throw std::invalid_argument("step: null buffer");
    // h_n and c_n may not alias h0 and c0 (stack_forward reads each layer's entering state
    // after writing the previous layer's final one)
    thread_local std::vector<T> hn, cn;
    hn.resize(s.num_layers * B * s.out_size());
    cn.resize(s.is_lstm() ? s.num_layers * B * s.hidden_size : 1);
    ForwardArgs<T> a;
    a.steps = 1; a.batch = B; a.x = x; a.h0 = h; a.c0 = s.is_lstm() ? c : nullptr;
    a.packed = packed;
    a.recurrent_precision = precision;
    ForwardOut<T> o{y, hn.data(), s.is_lstm() ? cn.data() : nullptr};
    stack_forward<T>(s, params, a, o, nullptr);
    std::copy(hn.begin(), hn.end(), h);
    if (s.is_lstm()) std::copy(cn.begin(), cn.end(), c);
}

namespace {
template <class T> const KernelFns<T>& fns_of(const KernelTable& t);
template <> const KernelFns<float>& fns_of<float>(const KernelTable& t) { return t.f32; }
template <> const KernelFns<double>& fns_of<double>(const KernelTable& t) { return t.f64; }

// The step job of layer l of a stack (its input, state and scratch set by the caller).
template <class T>
StepJob<T> layer_step_job(const LayerSpec& s, int64_t l, const DirParams<T>& w, int64_t B) {
    StepJob<T> j{};
    j.cell = (int)s.cell;
    j.batch = B; j.in = s.layer_input_size(l); j.hid = s.hidden_size; j.out = s.out_size();
    j.peephole = s.peephole; j.coupled = s.coupled_gates; j.lbr = s.linear_before_reset;
    j.w = w;
    return j;
}

// One streaming step through the layers in turn: run(job, l) steps layer l of the stack.
template <class T, class Run>
void step_layers(const LayerSpec& s, const std::vector<DirParams<T>>& params, int64_t B, const T* x,
                 T* h, T* c, T* y, const KernelFns<T>& fns, Run&& run) {
    if (s.bidirectional)
        throw std::invalid_argument("step: a bidirectional layer needs the whole sequence");
    if ((int64_t)params.size() != s.num_layers)
        throw std::invalid_argument("params: expected one entry per layer");
    if (B < 1) throw std::invalid_argument("x: expected a batch of at least 1, got " + str(B));
    if (!x || !h || !y || (s.is_lstm() && !c)) throw std::invalid_argument("step: null buffer");
    const int64_t H = s.hidden_size, P = s.out_size();
    thread_local std::vector<T> work;
    const T* in = x;
    for (int64_t l = 0; l < s.num_layers; ++l) {
        StepJob<T> j = layer_step_job<T>(s, l, params[l], B);
        if (l == 0) work.resize(fns.step_work(j) + 64);   // (the same for every layer)
        j.x = in;
        j.h = h + l * B * P;
        j.c = s.is_lstm() ? c + l * B * H : nullptr;
        j.work = work.data();
        run(j, l);
        in = j.h;
    }
    std::memcpy(y, h + (s.num_layers - 1) * B * P, sizeof(T) * B * P);
}
}  // namespace

template <class T>
void stack_step(const LayerSpec& s, const std::vector<DirParams<T>>& params, int64_t B,
                const T* x, T* h, T* c, T* y) {
    const KernelFns<T>& fns = kernels<T>();
    step_layers<T>(s, params, B, x, h, c, y, fns, [&](const StepJob<T>& j, int64_t) { fns.step(j); });
}

template <class T> struct StepPacks<T>::Impl {
    const KernelTable* table;
    LayerSpec spec;                      // of the stack it was packed for
    std::vector<std::vector<T>> packs;   // one a layer, over-allocated by 64 bytes: see layer()
    const T* layer(int64_t l) const {    // 64-byte aligned start (no split loads)
        const T* p = packs[l].data();
        const size_t mis = reinterpret_cast<uintptr_t>(p) % 64;
        return mis ? p + (64 - mis) / sizeof(T) : p;
    }
};

template <class T>
StepPacks<T>::StepPacks(const LayerSpec& s, const std::vector<DirParams<T>>& params)
    : impl_(new Impl{&active_kernels(), s, {}}) {
    s.validate();
    if (s.bidirectional)
        throw std::invalid_argument("step: a bidirectional layer needs the whole sequence");
    if ((int64_t)params.size() != s.num_layers)
        throw std::invalid_argument("params: expected one entry per layer");
    const KernelFns<T>& fns = fns_of<T>(*impl_->table);
    for (int64_t l = 0; l < s.num_layers; ++l) {
        const StepJob<T> j = layer_step_job<T>(s, l, params[l], 1);
        impl_->packs.emplace_back(fns.step_pack_size(j) + 64 / sizeof(T));
        fns.step_pack(j, const_cast<T*>(impl_->layer(l)));
    }
}
template <class T> StepPacks<T>::~StepPacks() = default;
template <class T> int64_t StepPacks<T>::bytes() const {
    int64_t n = 0;
    for (const std::vector<T>& p : impl_->packs) n += (int64_t)(p.size() * sizeof(T));
    return n;
}

template <class T>
void stack_step(const LayerSpec& s, const std::vector<DirParams<T>>& params, int64_t B,
                const T* x, T* h, T* c, T* y, const StepPacks<T>& packs) {
    const typename StepPacks<T>::Impl& pk = packs.impl();
    if (pk.spec != s)   // (the layout depends on the whole configuration)
        throw std::invalid_argument("step: the packed weights are another stack's");
    // the kernels that packed them (set_isa may have changed the active ones since)
    const KernelFns<T>& fns = fns_of<T>(*pk.table);
    step_layers<T>(s, params, B, x, h, c, y, fns,
                   [&](const StepJob<T>& j, int64_t l) { fns.step_packed(j, pk.layer(l)); });
}

int64_t rtrl_state_size(const LayerSpec& s) { return s.is_lstm() ? 2 * s.hidden_size : s.hidden_size; }

int64_t rtrl_param_count(const LayerSpec& s) {
    const int64_t GH = s.gates() * s.hidden_size;
    return GH * (s.input_size + s.hidden_size) + (s.bias ? 2 * GH : 0);
}

template <class T>
void rtrl_step(const LayerSpec& s, const DirParams<T>& w, const T* x, T* h, T* c, T* P) {
    s.validate();
    if (s.num_layers != 1 || s.bidirectional || s.proj_size > 0 || s.peephole)
        throw std::invalid_argument("rtrl: expected a single-layer, unidirectional layer without "
                                    "projection or peepholes");
    const int64_t I = s.input_size, H = s.hidden_size, G = s.gates(), GH = G * H;
    const int64_t S = rtrl_state_size(s), NT = rtrl_param_count(s);
    const bool lstm = s.is_lstm();
    // One step for S identical rows, then backward with the identity as the gradient of the
    // new state: row r yields d s_r / d s_{t-1} and d s_r / d (pre-activations).
    std::vector<T> xr(S * I), gates(S * GH), hbuf(2 * S * H), cbuf(lstm ? 2 * S * H : 0),
        extra(s.cell == CellType::GRU ? S * H : 0), y(S * H);
    for (int64_t r = 0; r < S; ++r) {
        std::memcpy(xr.data() + r * I, x, sizeof(T) * I);
        std::memcpy(hbuf.data() + r * H, h, sizeof(T) * H);
        if (lstm) std::memcpy(cbuf.data() + r * H, c, sizeof(T) * H);
    }
    DirJob<T> j{};
    j.cell = (int)s.cell;
    j.steps = 1; j.batch = S; j.in = I; j.hid = H; j.out = H;
    j.peephole = false; j.coupled = s.coupled_gates; j.lbr = s.linear_before_reset; j.reverse = false;
    j.lengths = nullptr; j.w = w; j.x = xr.data();
    j.gates = gates.data(); j.hbuf = hbuf.data(); j.cbuf = lstm ? cbuf.data() : nullptr;
    j.mbuf = nullptr; j.extra = extra.empty() ? nullptr : extra.data();
    j.y = y.data(); j.ldy = H;
    kernels<T>().dir_forward(j);

    std::vector<T> dh(S * H, T(0)), dc(lstm ? S * H : 1, T(0)), dgx(S * GH), dgh;
    for (int64_t r = 0; r < H; ++r) dh[r * H + r] = T(1);
    if (lstm)
        for (int64_t r = 0; r < H; ++r) dc[(H + r) * H + r] = T(1);
    const bool lbr_gru = s.cell == CellType::GRU && s.linear_before_reset;
    if (lbr_gru) dgh.resize(S * GH);
    std::vector<T> gw_ih(GH * I, T(0)), gw_hh(GH * H, T(0)), gb_ih(GH, T(0)), gb_hh(GH, T(0));
    DirBackJob<T> bj{};
    bj.f = j;
    bj.dy = nullptr; bj.ldy = H;
    bj.dh = dh.data(); bj.dc = dc.data();
    bj.dgx = dgx.data(); bj.dgh = lbr_gru ? dgh.data() : nullptr; bj.dhs = nullptr;
    bj.g.w_ih = gw_ih.data(); bj.g.w_hh = gw_hh.data();
    bj.g.b_ih = w.b_ih ? gb_ih.data() : nullptr; bj.g.b_hh = w.b_hh ? gb_hh.data() : nullptr;
    bj.dx = nullptr; bj.dx_accumulate = false;   // (no input gradient needed)
    kernels<T>().dir_backward(bj);

    // J_s [S, S]: row r = (d s_r / d h_{t-1}, d s_r / d c_{t-1}) = (dh0 row r, dc0 row r)
    std::vector<T> J(S * S);
    for (int64_t r = 0; r < S; ++r) {
        std::memcpy(J.data() + r * S, dh.data() + r * H, sizeof(T) * H);
        if (lstm) std::memcpy(J.data() + r * S + H, dc.data() + r * H, sizeof(T) * H);
    }
    std::vector<T> Pn(S * NT);
    gemm<T>(false, false, S, NT, S, T(1), J.data(), S, P, NT, T(0), Pn.data(), NT);
    // the immediate dependence on the parameters: d a / d W_ih[g, k] = x_k,
    // d a / d W_hh[g, j] = h_{t-1, j} (r * h_{t-1} for the n gate of Cho's GRU), biases 1
    const T* dgh_p = lbr_gru ? dgh.data() : dgx.data();
    const bool gru_orig = s.cell == CellType::GRU && !s.linear_before_reset;
    for (int64_t r = 0; r < S; ++r) {
        T* row = Pn.data() + r * NT;
        const T* a = dgx.data() + r * GH;
        const T* ah = dgh_p + r * GH;
        for (int64_t g = 0; g < GH; ++g) {
            const T av = a[g], ahv = lbr_gru && g < 2 * H ? a[g] : ah[g];   // dgh holds only n's
            T* wi = row + g * I;
            for (int64_t k = 0; k < I; ++k) wi[k] += av * x[k];
            const T* hin = (gru_orig && g >= 2 * H) ? extra.data() : h;   // row 0 of r * h
            T* wh = row + GH * I + g * H;
            for (int64_t k = 0; k < H; ++k) wh[k] += ahv * hin[k];
            if (s.bias) {
                row[GH * (I + H) + g] += av;
                row[GH * (I + H) + GH + g] += ahv;
            }
        }
    }
    std::memcpy(P, Pn.data(), sizeof(T) * S * NT);
    std::memcpy(h, hbuf.data() + S * H, sizeof(T) * H);
    if (lstm) std::memcpy(c, cbuf.data() + S * H, sizeof(T) * H);
}

template <class T>
void adam_update(int64_t n, T* p, const T* g, T* m, T* v, double lr, double b1, double b2, double eps,
                 double wd, bool decoupled, int64_t step) {
    if (step < 1) throw std::invalid_argument("step: expected >= 1, got " + str(step));
    if (n <= 0) return;
    AdamStep<T> a;
    a.n = n; a.p = p; a.g = g; a.m = m; a.v = v;
    // the scalars as optim.Adam's NumPy code rounds them (Python floats taken as T)
    a.b1 = (T)b1; a.b2 = (T)b2; a.c1 = (T)(1 - b1); a.c2 = (T)(1 - b2); a.eps = (T)eps; a.wd = (T)wd;
    a.decay = (T)(1 - lr * wd);
    a.sqrt_bc2 = (T)std::sqrt(1 - std::pow(b2, (double)step));
    a.lr_bc1 = (T)(lr / (1 - std::pow(b1, (double)step)));
    a.mode = wd == 0 ? 0 : decoupled ? 2 : 1;
    kernels<T>().adam(a);
}

template <class T> double sum_squares(int64_t n, const T* x) {
    double s[4] = {0, 0, 0, 0};   // four chains, so the adds overlap
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int k = 0; k < 4; ++k) s[k] += (double)x[i + k] * (double)x[i + k];
    for (; i < n; ++i) s[0] += (double)x[i] * (double)x[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

template <class T>
void scatter_add_rows(int64_t V, int64_t E, T* out, int64_t n, const int64_t* ids, const T* rows) {
    for (int64_t k = 0; k < n; ++k)
        if (ids[k] < 0 || ids[k] >= V)
            throw std::invalid_argument("ids: expected values in [0, " + str(V) + "), got " + str(ids[k]) +
                                        " at index " + str(k));
    for (int64_t k = 0; k < n; ++k) {
        T* dst = out + ids[k] * E;
        const T* src = rows + k * E;
        for (int64_t e = 0; e < E; ++e) dst[e] += src[e];
    }
}

template <class T>
double softmax_cross_entropy(int64_t R, int64_t C, const T* z, const int64_t* t, const T* w, T* g) {
    if (R < 0 || C < 1) throw std::invalid_argument("logits: expected at least one class, got " + str(C));
    for (int64_t r = 0; r < R; ++r)
        if (t[r] < 0 || t[r] >= C)
            throw std::invalid_argument("targets: expected class ids in [0, " + str(C - 1) + "], got " +
                                        str(t[r]) + " at index " + str(r));
    return R > 0 ? kernels<T>().softmax_xent(R, C, z, t, w, g) : 0.0;
}

template <class T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
    kernels<T>().gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

#define RNNCORE_INSTANTIATE(T)                                                                   \
    template void stack_forward<T>(const LayerSpec&, const std::vector<DirParams<T>>&,           \
                                   const ForwardArgs<T>&, const ForwardOut<T>&,                  \
                                   std::shared_ptr<StackCache<T>>*);                            \
    template void stack_backward<T>(const LayerSpec&, const std::vector<DirParams<T>>&,          \
                                    const StackCache<T>&, const BackwardArgs<T>&,                \
                                    const BackwardOut<T>&, const std::vector<DirGrads<T>>&);     \
    template int64_t cache_steps<T>(const StackCache<T>&);                                        \
    template void stack_step<T>(const LayerSpec&, const std::vector<DirParams<T>>&, int64_t,     \
                                const T*, T*, T*, T*);                                            \
    template void stack_step<T>(const LayerSpec&, const std::vector<DirParams<T>>&, int64_t,     \
                                const T*, T*, T*, T*, Precision, PackedWeights*);                 \
    template class StepPacks<T>;                                                                  \
    template void stack_step<T>(const LayerSpec&, const std::vector<DirParams<T>>&, int64_t,     \
                                const T*, T*, T*, T*, const StepPacks<T>&);                       \
    template void rtrl_step<T>(const LayerSpec&, const DirParams<T>&, const T*, T*, T*, T*);                                        \
    template int64_t cache_batch<T>(const StackCache<T>&);                                        \
    template double sum_squares<T>(int64_t, const T*);                                            \
    template void scatter_add_rows<T>(int64_t, int64_t, T*, int64_t, const int64_t*, const T*);  \
    template double softmax_cross_entropy<T>(int64_t, int64_t, const T*, const int64_t*, const T*, T*); \
    template void adam_update<T>(int64_t, T*, const T*, T*, T*, double, double, double, double, double, \
                                 bool, int64_t);                                                  \
    template void gemm<T>(bool, bool, int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, \
                          int64_t, T, T*, int64_t);
RNNCORE_INSTANTIATE(float)
RNNCORE_INSTANTIATE(double)

}  // namespace rnncore
