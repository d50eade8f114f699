// rnncore runtime: version, threads, the instruction set in use, CUDA availability.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rnncore {

const char* version();

// Threads used by the kernels. Default: OMP_NUM_THREADS if set, else the number of cores.
void set_num_threads(int n);   // n >= 1; throws std::invalid_argument otherwise
int get_num_threads();
bool openmp_enabled();

// The kernel ISA: "avx512", "avx2", "neon" or "generic". Chosen once from the CPU; the
// environment variable RNNCORE_ISA (generic|avx2|avx512) overrides it, and set_isa()
// switches at run time (tests use it to check every path). Asking for an ISA the CPU
// lacks throws std::invalid_argument.
std::string isa_name();
void set_isa(const std::string& name);
std::string available_isas();   // comma-separated, best first
std::string detected_isa();     // best ISA this CPU supports

// AMX (Intel Sapphire Rapids and later): with the avx512 kernels, the large float32 GEMMs
// (weight and input gradients of BPTT, standalone products) run on the tile unit, each
// operand split exactly into three bfloat16 parts so that the result keeps float32 accuracy
// (not bit-identical to the FMA GEMM). On by default where the CPU and OS allow it;
// RNNCORE_AMX=0 in the environment or set_amx(false) switches it off; set_amx(true) where it
// cannot be used throws std::invalid_argument saying why. amx_status() says which.
bool amx_enabled();
void set_amx(bool on);
std::string amx_status();

// The float32 sigmoid (which = 0) or tanh (1) of the active kernels, for tests.
void fast_activation(int which, int64_t n, const float* x, float* y);
// The L2 cache of one core in bytes, as the kernels plan for it: what the OS reports
// (sysconf), 1 MiB where it reports nothing; the environment variable RNNCORE_L2_BYTES
// (0 to 1 GiB; tests use 0 to take the paths of slices larger than the L2) overrides it.
// Read once.
int64_t l2_cache_bytes();
// Read bandwidth (GB/s) of the calling thread over a buffer of `bytes`, for benchmarks.
double read_bandwidth(int64_t bytes, int reps);
// The round trip between two threads of the kernels' team, in ns, for benchmarks: two
// threads pass a count back and forth `rounds` times (1 to 10^7) through one cache line. It
// bounds a recurrence team's step from below (a team of two meets once a step). NaN where
// fewer than two threads are set, inside a parallel region, or without OpenMP.
double thread_round_trip_ns(int rounds);

// Where a recurrence spends its time, by phase, for profiling: with RNNCORE_PHASES=1 in the
// environment (read once), the kernels add the seconds each thread of a recurrence team spends
// in each phase (names in phase_names()): forward.pack (the kept packed weights' check, their
// packing when stale, scratch), forward.projection (x @ W_ih^T), forward.product (h @ W_hh^T
// of each step, with the split-phase product's wait for the others), forward.cell (the gate
// arithmetic; Cho's GRU and projected LSTMs: their second product too), forward.sync (the
// step barrier), the same for the backward's time loop (backward.cell: the gate gradients,
// dh += dy, the bias sums), and backward.weight_grads and backward.input_grads, the calling
// thread's wall time of the team's GEMMs after the loop. phase_times() returns them, per phase
// the seconds of threads 0..n-1 (n the most threads seen), and clears them if reset; empty when
// the variable is not set. A streaming step is not timed.
bool phase_timing();
std::vector<std::string> phase_names();   // in the order of phase_times()
std::vector<std::vector<double>> phase_times(bool reset);

// Forward calls (inference or training) of a multi-layer stack that ran its layers at once
// (the layer pipeline, layer.cpp), and backward calls that did, since the process started:
// for tests and profiling.
int64_t layer_pipeline_runs();
// The idle core's input projection (a layer whose recurrence runs on one thread at up to four
// batch rows projects its blocks of input rows on a second thread, cpu/impl.hpp): -1 (auto, the
// default: chosen per layer by the measured time of its calls with and without it), 0 (off) or
// 1 (on wherever it applies); RNNCORE_IDLE_PROJECTION=0/1 in the environment sets the start.
// Results are the same bit for bit either way. idle_projection_runs(): forward calls that took
// it since the process started.
int idle_projection();
void set_idle_projection(int mode);
int64_t idle_projection_runs();
// Batch 1: the next block of input rows projected a panel of W_ih at a time beside each step's
// recurrent product (its FMAs run while the product waits for W_hh from the L2), on by default;
// RNNCORE_SPREAD_PROJECTION=0 in the environment switches it off from the start. The results
// are the same bit for bit either way. spread_projection_runs(): forward calls that took it
// (one a layer direction's thread) since the process started.
bool spread_projection();
void set_spread_projection(bool on);
int64_t spread_projection_runs();
// A team of two for the small layers (a step under 6e4 multiply-adds, whose recurrence otherwise
// runs on one thread, inference at up to four batch rows, cpu/impl.hpp): -1 (auto, the default:
// each layer direction chooses among one thread, one thread with the idle core's projection and
// a team of two by the measured time of its calls), 0 (never) or 1 (wherever it applies);
// RNNCORE_SMALL_TEAM=0/1 in the environment sets the start. The team's threads sum every product
// in the one thread's order: results are the same bit for bit either way. small_team_runs():
// forward calls that ran such a team since the process started.
int small_team();
void set_small_team(int mode);
int64_t small_team_runs();
int64_t layer_pipeline_backward_runs();

// The exchange pages of a recurrence team of two (cpu/impl.hpp): {state (0 not measured, 1
// being measured, 2 measured), the two chosen candidate pages (-1: none), the calls that used
// them, then per candidate page its round trip between the team's two threads in ns}.
std::vector<int64_t> exchange_status();

bool cuda_built();
bool cuda_available();
std::string cuda_status();      // why CUDA can or cannot be used

}  // namespace rnncore
