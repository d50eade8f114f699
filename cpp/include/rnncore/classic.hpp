// rnncore: the classic recurrent algorithms: Hopfield networks, second-order RNNs and
// real-time recurrent learning (RTRL). Same notation as layer.hpp (T, B, I, H, S state size).
#pragma once

#include <cstdint>
#include <vector>

#include "rnncore/layer.hpp"

namespace rnncore {

// ---------------------------------------------------------------- Hopfield networks
// W [N, N] (row-major, symmetric, zero diagonal); states and patterns are bipolar (+1/-1).
enum class HopfieldRule : int { HEBBIAN = 0, STORKEY = 1 };
enum class HopfieldMode : int { ASYNC = 0, SYNC = 1 };

// Adds P patterns [P, N] to W with the Hebbian rule (W += x x^T / N) or Storkey's 1997 rule
// (pattern by pattern, each update computed from the weights before it).
void hopfield_store(int64_t n, double* W, const double* patterns, int64_t P, HopfieldRule rule);

// Updates state [N] in place until it is a fixed point or max_iter sweeps have run. Async:
// one unit at a time in a seeded random order each sweep (energy never rises); sync: all
// units at once. A unit whose field is exactly 0 keeps its value. Returns the sweeps run;
// *converged tells whether the last sweep changed nothing.
int64_t hopfield_recall(int64_t n, const double* W, double* state, HopfieldMode mode,
                        int64_t max_iter, uint64_t seed, bool* converged);

double hopfield_energy(int64_t n, const double* W, const double* state);   // -s^T W s / 2

// ---------------------------------------------------------------- second-order RNNs
// Full (Giles et al.): h_t = tanh(sum_jk W[i, j, k] h_{t-1, j} x_{t, k} + b_i), W [H, H, I].
// Factored, rank r (Sutskever et al. 2011, multiplicative RNN):
//   f_t = (W_fx x_t) * (W_fh h_{t-1}),  h_t = tanh(W_hf f_t + W_hx x_t + b),
//   W_fx [r, I], W_fh [r, H], W_hf [H, r], W_hx [H, I].
template <class T> struct SecondOrderParams {
    int64_t input_size = 0, hidden_size = 0, rank = 0;   // rank 0: the full form
    const T* w = nullptr;                                  // full
    const T* w_fx = nullptr; const T* w_fh = nullptr; const T* w_hf = nullptr; const T* w_hx = nullptr;
    const T* b = nullptr;
};
template <class T> struct SecondOrderGrads {
    T* w = nullptr; T* w_fx = nullptr; T* w_fh = nullptr; T* w_hf = nullptr; T* w_hx = nullptr; T* b = nullptr;
};
template <class T> struct SecondOrderCache;

// x [T, B, I], h0 [B, H] or null, lengths [B] or null; y [T, B, H], h_n [B, H].
template <class T>
void second_order_forward(const SecondOrderParams<T>& p, int64_t steps, int64_t batch, const T* x,
                          const T* h0, const int64_t* lengths, T* y, T* h_n,
                          std::shared_ptr<SecondOrderCache<T>>* cache);
// dy [T, B, H] or null, dh_n [B, H] or null -> dx [T, B, I], dh0 [B, H]; grads accumulate.
template <class T>
void second_order_backward(const SecondOrderParams<T>& p, const SecondOrderCache<T>& cache,
                           const T* dy, const T* dh_n, T* dx, T* dh0, const SecondOrderGrads<T>& g);
template <class T> int64_t second_order_cache_steps(const SecondOrderCache<T>& c);
template <class T> int64_t second_order_cache_batch(const SecondOrderCache<T>& c);

// ---------------------------------------------------------------- RTRL
// Real-time recurrent learning for one single-layer, unidirectional RNN/GRU/LSTM (no
// projection, no peepholes). The state s has S = H (RNN, GRU) or 2H (LSTM: h then c)
// components; the recurrent parameters theta are, in this order, W_ih, W_hh, b_ih, b_hh
// (row-major, biases when the layer has them): n_theta of them.
// One step: s_t = F(s_{t-1}, x_t); the sensitivities P = ds/dtheta [S, n_theta] are carried
// forward exactly: P_t = (ds_t/ds_{t-1}) P_{t-1} + (ds_t/dtheta)_immediate. Cost per step
// O(S^2 n_theta) = O(H^4) multiply-adds, memory O(S n_theta).
int64_t rtrl_state_size(const LayerSpec& spec);
int64_t rtrl_param_count(const LayerSpec& spec);
// x [I]; h [H], c [H] (LSTM) updated in place; P [S, n_theta] updated in place.
template <class T>
void rtrl_step(const LayerSpec& spec, const DirParams<T>& params, const T* x, T* h, T* c, T* P);

}  // namespace rnncore
