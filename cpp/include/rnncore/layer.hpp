// rnncore: the recurrent layer stack (RNN, LSTM, GRU) as seen from C++.
//
// Notation used in every shape comment of this project:
//   T time, B batch, I input, H hidden, P output of a direction (proj_size or H),
//   G gates (1 RNN, 4 LSTM, 3 GRU), D directions, L layers.
// Memory layout is row-major, time-major: x [T, B, I], y [T, B, D*P].
// Parameters follow PyTorch: W_ih [G*H, I_k], W_hh [G*H, P], b_ih [G*H], b_hh [G*H],
// W_hr [P, H] (LSTM projection), W_peep [3, H] (peepholes, order i, f, o).
// Gate order: LSTM i, f, g, o; GRU r, z, n.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace rnncore {

enum class CellType : int { RNN_TANH = 0, RNN_RELU = 1, LSTM = 2, GRU = 3 };

struct LayerSpec {
    CellType cell = CellType::LSTM;
    int64_t input_size = 0;
    int64_t hidden_size = 0;
    int64_t num_layers = 1;
    int64_t proj_size = 0;          // LSTM only; 0 = none
    bool bias = true;
    bool bidirectional = false;
    bool peephole = false;          // LSTM only
    bool coupled_gates = false;     // LSTM only (CIFG: i = 1 - f)
    bool linear_before_reset = true;  // GRU only

    int gates() const { return cell == CellType::LSTM ? 4 : cell == CellType::GRU ? 3 : 1; }
    int dirs() const { return bidirectional ? 2 : 1; }
    int64_t out_size() const { return proj_size > 0 ? proj_size : hidden_size; }   // P
    int64_t layer_input_size(int64_t layer) const {
        return layer == 0 ? input_size : out_size() * dirs();
    }
    bool is_lstm() const { return cell == CellType::LSTM; }
    // Throws std::invalid_argument naming the offending field.
    void validate() const;
    bool operator==(const LayerSpec& o) const {   // the same configuration, field by field
        return cell == o.cell && input_size == o.input_size && hidden_size == o.hidden_size &&
               num_layers == o.num_layers && proj_size == o.proj_size && bias == o.bias &&
               bidirectional == o.bidirectional && peephole == o.peephole &&
               coupled_gates == o.coupled_gates && linear_before_reset == o.linear_before_reset;
    }
    bool operator!=(const LayerSpec& o) const { return !(*this == o); }
};

struct ParamInfo {
    std::string name;             // PyTorch name, e.g. "weight_ih_l0_reverse"
    std::vector<int64_t> shape;
    int64_t layer;
    int dir;
    int kind;                     // ParamKind
};
enum ParamKind : int { W_IH = 0, W_HH = 1, B_IH = 2, B_HH = 3, W_HR = 4, W_PEEP = 5 };

// All parameters of a stack, in PyTorch's state_dict order (then peepholes per direction).
std::vector<ParamInfo> param_info(const LayerSpec& spec);

// Pointers to one direction of one layer. Absent tensors are nullptr.
template <class T> struct DirParams {
    const T* w_ih = nullptr; const T* w_hh = nullptr;
    const T* b_ih = nullptr; const T* b_hh = nullptr;
    const T* w_hr = nullptr; const T* w_peep = nullptr;
};
template <class T> struct DirGrads {
    T* w_ih = nullptr; T* w_hh = nullptr; T* b_ih = nullptr; T* b_hh = nullptr;
    T* w_hr = nullptr; T* w_peep = nullptr;
};

// Points the member of `p` (a DirParams or DirGrads) named by `kind` at `ptr`.
template <class Ptrs, class T> inline void set_param(Ptrs& p, int kind, T* ptr) {
    switch (kind) {
        case W_IH: p.w_ih = ptr; break;
        case W_HH: p.w_hh = ptr; break;
        case B_IH: p.b_ih = ptr; break;
        case B_HH: p.b_hh = ptr; break;
        case W_HR: p.w_hr = ptr; break;
        case W_PEEP: p.w_peep = ptr; break;
        default: break;
    }
}

// What forward keeps for backward (opaque to callers).
template <class T> struct StackCache;

// Packed copies of a stack's recurrent weights, kept from call to call by whoever passes
// the same object (ForwardArgs::packed): a Python layer keeps one, a loaded Model one per
// block. Each thread of the recurrence checks its packed slice against a 64-bit content
// hash of the rows it was packed from (one read at about memory speed; about half of what
// packing cost at T=25 B=1 H=1024) and repacks on any difference, so a change made in any
// way, in place included, is seen by the very next call. `trusted` skips the content check
// for weights that never change (a Model's). One call uses it at a time; a concurrent call
// that finds it busy packs for itself, as it would without it. Memory: about the size of
// W_hh (and W_hr), and of W_ih where the call packs it (many input rows for its size).
class PackedWeights {
  public:
    explicit PackedWeights(bool trusted = false);
    ~PackedWeights();
    PackedWeights(const PackedWeights&) = delete;
    PackedWeights& operator=(const PackedWeights&) = delete;
    int64_t bytes() const;   // memory held
    int64_t packs() const;   // thread slices packed so far (a reuse adds none)
    bool trusted() const;
    void clear();            // frees it (the next call packs again)
    struct Impl;
    Impl& impl() { return *impl_; }

  private:
    std::unique_ptr<Impl> impl_;
};

// Precision of the recurrent weights (W_hh, W_hr) in inference. BFloat16 rounds them to
// bfloat16 (nearest even) and streams them from the cache at half the bytes; the input
// projection, the states, the products and their sums stay float32. For float32 stacks
// without a cache (inference) only: what batch-1 inference is bound by is the bytes of W_hh
// read at every step.
enum class Precision : int { Float32 = 0, BFloat16 = 1 };

// Inputs of a stack call. Shapes (batched form; callers add B = 1 for unbatched input):
//   x [T, B, I]; h0 [L*D, B, P] or null (zeros); c0 [L*D, B, H] or null (LSTM);
//   lengths [B] or null (all T), each in 1..T;
//   dropout_masks: L-1 masks [T, B, D*P] applied to the input of layers 1..L-1, or null.
template <class T> struct ForwardArgs {
    int64_t steps = 0, batch = 0;
    const T* x = nullptr;
    const T* h0 = nullptr;
    const T* c0 = nullptr;
    const int64_t* lengths = nullptr;
    const T* const* dropout_masks = nullptr;
    PackedWeights* packed = nullptr;   // kept packed weights (see above), or null
    Precision recurrent_precision = Precision::Float32;   // BFloat16: inference, float only
};
// Outputs: y [T, B, D*P]; h_n [L*D, B, P]; c_n [L*D, B, H] (LSTM, else unused).
template <class T> struct ForwardOut {
    T* y = nullptr; T* h_n = nullptr; T* c_n = nullptr;
};

// Runs the stack. params: L*D entries, index layer*D + dir. When cache is non-null the
// activations needed by backward are kept in it (training); otherwise nothing is kept.
// Thread-safe: it only reads params and writes its outputs and cache.
template <class T>
void stack_forward(const LayerSpec& spec, const std::vector<DirParams<T>>& params,
                   const ForwardArgs<T>& args, const ForwardOut<T>& out,
                   std::shared_ptr<StackCache<T>>* cache);

// Backpropagation through time. dy [T, B, D*P] (may be null: zeros), dh_n [L*D, B, P] and
// dc_n [L*D, B, H] (may be null). Writes dx [T, B, I], dh0, dc0; accumulates (+=) into grads.
// out.dx may be null: the input gradient of the first layer is then not computed (its GEMM
// skipped, as a training loop on data needs no gradient of the data).
template <class T> struct BackwardArgs {
    const T* dy = nullptr; const T* dh_n = nullptr; const T* dc_n = nullptr;
};
template <class T> struct BackwardOut {
    T* dx = nullptr; T* dh0 = nullptr; T* dc0 = nullptr;
};
template <class T>
void stack_backward(const LayerSpec& spec, const std::vector<DirParams<T>>& params,
                    const StackCache<T>& cache, const BackwardArgs<T>& args,
                    const BackwardOut<T>& out, const std::vector<DirGrads<T>>& grads);

// Memory kept between calls. stack_forward and stack_backward keep their buffers (inference's
// activations and outputs, the backward's gradient buffers, one spare training cache) per
// thread, so that repeated calls fault in and zero no new pages. A group of them that holds
// 16 MiB or more is trimmed to its last call's sizes after 8 calls in a row that used under a
// quarter of it (so one large call does not hold its memory for good, and calls alternating
// between sizes keep theirs). release_memory() frees them all: the calling thread's at once
// (unless a call of its own is in progress) and every other thread's at the start of its next
// call. The next call of a size then allocates them again.
void release_memory();
// Bytes of those buffers the calling thread holds now.
int64_t kept_memory_bytes();

// One time step of a unidirectional stack (streaming). x [B, I]; h [L, B, P] and c [L, B, H]
// (LSTM) are read and updated in place; y [B, P] receives the last layer's output.
// No dropout. Thread-safe for distinct states.
template <class T>
void stack_step(const LayerSpec& spec, const std::vector<DirParams<T>>& params, int64_t batch,
                const T* x, T* h, T* c, T* y);
// The same step with bfloat16 recurrent weights (float only): one step of stack_forward with
// the packed copies kept in `packed` (the step kernels read the float32 rows), the state
// still updated in place. Precision::Float32 is the step above.
template <class T>
void stack_step(const LayerSpec& spec, const std::vector<DirParams<T>>& params, int64_t batch,
                const T* x, T* h, T* c, T* y, Precision precision, PackedWeights* packed);

// A unidirectional stack's weights packed once for the fused streaming-step kernels, for
// weights that never change (a frozen layer's, a loaded Model's): each layer's gate biases,
// W_ih and W_hh side by side per group of hidden units, so one step reads every weight once
// in one sequential stream and keeps the gate pre-activations in registers. Packed at
// construction by the kernels active then (which its steps keep using); `params` (biases,
// peepholes) must be the ones it was packed from whenever it is passed to stack_step.
// Results agree with the step above to float32 rounding (another order of the sums), not
// bit for bit.
template <class T> class StepPacks {
  public:
    StepPacks(const LayerSpec& spec, const std::vector<DirParams<T>>& params);
    ~StepPacks();
    StepPacks(const StepPacks&) = delete;
    StepPacks& operator=(const StepPacks&) = delete;
    int64_t bytes() const;   // memory held
    struct Impl;
    const Impl& impl() const { return *impl_; }

  private:
    std::unique_ptr<Impl> impl_;
};
template <class T>
void stack_step(const LayerSpec& spec, const std::vector<DirParams<T>>& params, int64_t batch,
                const T* x, T* h, T* c, T* y, const StepPacks<T>& packs);

template <class T> int64_t cache_steps(const StackCache<T>& c);
template <class T> int64_t cache_batch(const StackCache<T>& c);

// One Adam step (AdamW where decoupled) of n parameters in place, torch.optim's rule: with
// weight decay wd, g += wd * p (Adam) or p *= 1 - lr * wd (AdamW); m = b1 m + (1 - b1) g;
// v = b2 v + (1 - b2) g g; p -= lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps).
// One vectorised pass of the active ISA. step >= 1.
template <class T>
void adam_update(int64_t n, T* p, const T* g, T* m, T* v, double lr, double b1, double b2, double eps,
                 double wd, bool decoupled, int64_t step);

// Softmax cross-entropy of R rows of C logits (row-major z [R, C]) against class ids t [R] with
// row weights w [R] (0: the row does not count): writes g [R, C] = w_r (softmax(z_r) - onehot(t_r))
// and returns sum_r w_r (logsumexp(z_r) - z_r[t_r]), one vectorised pass a row. Throws
// std::invalid_argument for a class id outside [0, C) before any work.
template <class T>
double softmax_cross_entropy(int64_t R, int64_t C, const T* z, const int64_t* t, const T* w, T* g);

// The sum of the squares of x[0..n), accumulated in double (a gradient-clipping norm).
template <class T> double sum_squares(int64_t n, const T* x);

// out[ids[k]] += rows[k] for k < n (out [V, E], rows [n, E]): the gradient of an embedding
// lookup. Throws std::invalid_argument for an id outside [0, V) before any row is added.
template <class T>
void scatter_add_rows(int64_t V, int64_t E, T* out, int64_t n, const int64_t* ids, const T* rows);

// C = alpha * op(A) @ op(B) + beta * C, row-major; op(X) = X^T when trans is true.
// A is [M, K] after op, B is [K, N] after op. Exposed for tests and benchmarks.
template <class T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
          const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

}  // namespace rnncore
