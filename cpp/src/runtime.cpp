// Threads, version and CUDA status.
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>

#include <sched.h>
#include <unistd.h>

#include "kernels.hpp"
#include "rnncore/runtime.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef RNNCORE_VERSION
#define RNNCORE_VERSION "0.0.0"
#endif

namespace rnncore {
namespace {
int default_threads() {
    const char* env = std::getenv("OMP_NUM_THREADS");
    if (env && *env) {
        char* end = nullptr;
        long v = std::strtol(env, &end, 10);
        if (end != env && v >= 1 && v <= 4096) return (int)v;
    }
    unsigned hc = std::thread::hardware_concurrency();
    return hc >= 1 ? (int)hc : 1;
}
std::atomic<int>& threads() {
    static std::atomic<int> n{default_threads()};
    return n;
}
}  // namespace

const char* version() { return RNNCORE_VERSION; }

void set_num_threads(int n) {
    if (n < 1) throw std::invalid_argument("n: expected a thread count >= 1, got " + std::to_string(n));
    threads().store(n);
}
int get_num_threads() {
#ifdef _OPENMP
    return threads().load();
#else
    return 1;
#endif
}
int threads_for_kernels() { return get_num_threads(); }

ExchangeBlock& exchange_block() {
    static ExchangeBlock x;
    return x;
}
std::vector<int64_t> exchange_status() {
    ExchangeBlock& x = exchange_block();
    std::vector<int64_t> out{__atomic_load_n(&x.state, __ATOMIC_ACQUIRE), -1, -1, 0};
    if (out[0] == 2) {
        out[1] = x.chosen[0];
        out[2] = x.chosen[1];
        out[3] = __atomic_load_n(&x.uses, __ATOMIC_RELAXED);
        for (int c = 0; c < ExchangeBlock::CAND; ++c) out.push_back(x.round_trip_ns[c]);
    }
    return out;
}

int64_t l2_cache_bytes() {
    static const int64_t bytes = [] {
        constexpr long long hi = 1LL << 30;
        const char* env = std::getenv("RNNCORE_L2_BYTES");
        if (env && *env) {
            char* end = nullptr;
            const long long v = std::strtoll(env, &end, 10);
            if (end != env && *end == 0 && v >= 0 && v <= hi) return (int64_t)v;
        }
        long long v = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
        v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        return (int64_t)(v >= (64LL << 10) && v <= hi ? v : 1LL << 20);
    }();
    return bytes;
}

void fast_activation(int which, int64_t n, const float* x, float* y) {
    if (which != 0 && which != 1) throw std::invalid_argument("which: expected 0 (sigmoid) or 1 (tanh)");
    kernels<float>().activations(which, n, x, y);
}

double read_bandwidth(int64_t bytes, int reps) {
    if (bytes < 256 || reps < 1) throw std::invalid_argument("read_bandwidth: bytes >= 256 and reps >= 1");
    return kernels<float>().read_bandwidth(bytes, reps);
}

namespace {
// A kernel switch: its mode from the environment at its first use ("0" or "1", else `dflt`),
// then from its setter, and the calls that took it (for tests and profiling).
struct Switch {
    std::atomic<int> mode;
    int64_t runs = 0;   // __atomic builtins
    Switch(const char* env, int dflt) {
        const char* e = std::getenv(env);
        mode = e && std::string(e) == "0" ? 0 : e && std::string(e) == "1" ? 1 : dflt;
    }
    int get() const { return mode.load(std::memory_order_relaxed); }
    void set(int m) {
        if (m < -1 || m > 1)
            throw std::invalid_argument("mode: expected -1 (auto), 0 (off) or 1 (on), got " + std::to_string(m));
        mode.store(m, std::memory_order_relaxed);
    }
    int64_t count() { return __atomic_load_n(&runs, __ATOMIC_RELAXED); }
    void note() { __atomic_add_fetch(&runs, 1, __ATOMIC_RELAXED); }
};
Switch& idle_switch() { static Switch s("RNNCORE_IDLE_PROJECTION", -1); return s; }
Switch& spread_switch() { static Switch s("RNNCORE_SPREAD_PROJECTION", 1); return s; }
Switch& team_switch() { static Switch s("RNNCORE_SMALL_TEAM", -1); return s; }
}  // namespace
int idle_projection() { return idle_switch().get(); }
void set_idle_projection(int mode) { idle_switch().set(mode); }
int64_t idle_projection_runs() { return idle_switch().count(); }
void note_idle_projection() { idle_switch().note(); }
bool spread_projection() { return spread_switch().get() != 0; }
void set_spread_projection(bool on) { spread_switch().set(on ? 1 : 0); }
int64_t spread_projection_runs() { return spread_switch().count(); }
void note_spread_projection() { spread_switch().note(); }
int small_team() { return team_switch().get(); }
void set_small_team(int mode) { team_switch().set(mode); }
int64_t small_team_runs() { return team_switch().count(); }
void note_small_team() { team_switch().note(); }

double thread_round_trip_ns(int rounds) {
    if (rounds < 1 || rounds > 10000000)
        throw std::invalid_argument("rounds: expected 1 to 10000000, got " + std::to_string(rounds));
#ifdef _OPENMP
    if (get_num_threads() < 2 || omp_in_parallel()) return std::nan("");
    struct alignas(64) Line {
        int64_t v = 0;
    };
    Line line;
    double ns = std::nan("");
    auto wait_for = [&](int64_t want) {
        for (int spin = 0; __atomic_load_n(&line.v, __ATOMIC_ACQUIRE) != want; ++spin) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            if (spin > 4000) sched_yield();   // (the other thread descheduled)
        }
    };
#pragma omp parallel num_threads(2)
    {
        if (omp_get_num_threads() == 2) {   // (both see the same team: neither waits alone)
            const int tid = omp_get_thread_num();
            const auto t0 = std::chrono::steady_clock::now();
            for (int64_t r = 1; r <= rounds; ++r) {
                if (tid == 0) {
                    __atomic_store_n(&line.v, 2 * r - 1, __ATOMIC_RELEASE);
                    wait_for(2 * r);
                } else {
                    wait_for(2 * r - 1);
                    __atomic_store_n(&line.v, 2 * r, __ATOMIC_RELEASE);
                }
            }
            if (tid == 0)
                ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / rounds;
        }
    }
    return ns;
#else
    return std::nan("");
#endif
}

namespace {
constexpr int PHASE_THREADS = MAX_TEAM;
int64_t phase_ns[PH_COUNT][PHASE_THREADS];   // atomics: a bidirectional layer runs two teams at once
int phase_threads_seen = 0;
}  // namespace

bool phase_timing() {
    static const bool on = [] {
        const char* env = std::getenv("RNNCORE_PHASES");
        return env && *env && std::string(env) != "0";
    }();
    return on;
}

std::vector<std::string> phase_names() {
    return {"forward.pack", "forward.projection", "forward.product", "forward.cell", "forward.sync",
            "backward.pack", "backward.cell", "backward.product", "backward.sync",
            "backward.weight_grads", "backward.input_grads"};
}

void phase_add(int phase, int tid, int64_t nanoseconds) {
    if (phase < 0 || phase >= PH_COUNT || tid < 0 || tid >= PHASE_THREADS) return;
    __atomic_fetch_add(&phase_ns[phase][tid], nanoseconds, __ATOMIC_RELAXED);
    int seen = __atomic_load_n(&phase_threads_seen, __ATOMIC_RELAXED);
    while (tid + 1 > seen &&
           !__atomic_compare_exchange_n(&phase_threads_seen, &seen, tid + 1, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

std::vector<std::vector<double>> phase_times(bool reset) {
    std::vector<std::vector<double>> out;
    if (!phase_timing()) return out;
    const int n = __atomic_load_n(&phase_threads_seen, __ATOMIC_RELAXED);
    for (int p = 0; p < PH_COUNT; ++p) {
        std::vector<double> row((size_t)n);
        for (int t = 0; t < n; ++t)
            row[(size_t)t] = 1e-9 * (double)(reset ? __atomic_exchange_n(&phase_ns[p][t], (int64_t)0, __ATOMIC_RELAXED)
                                                  : __atomic_load_n(&phase_ns[p][t], __ATOMIC_RELAXED));
        out.push_back(row);
    }
    if (reset) __atomic_store_n(&phase_threads_seen, 0, __ATOMIC_RELAXED);
    return out;
}

bool openmp_enabled() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

#ifndef RNNCORE_WITH_CUDA
bool cuda_built() { return false; }
bool cuda_available() { return false; }
std::string cuda_status() {
    return "not built: rnncore was compiled without CUDA (rebuild with RNNCORE_ENABLE_CUDA=ON and nvcc)";
}
#endif

}  // namespace rnncore
