// Run-time choice of the kernel ISA: detected once from the CPU, overridable with the
// environment variable RNNCORE_ISA or set_isa(). See kernels.hpp.
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.hpp"
#include "rnncore/runtime.hpp"

#if defined(RNNCORE_HAVE_X86_KERNELS) && defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && \
    !defined(RNNCORE_NO_AMX)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define RNNCORE_AMX_PROBE 1
#endif

namespace rnncore {
namespace {

bool cpu_has(const std::string& isa) {
    if (isa == "generic" || isa == "neon") {
#if defined(__aarch64__) || defined(__ARM_NEON)
        return true;
#else
        return isa == "generic";
#endif
    }
#if defined(RNNCORE_HAVE_X86_KERNELS)
    __builtin_cpu_init();
    if (isa == "avx2")
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == "avx512")
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return false;
}

const KernelTable* table_for(const std::string& name) {
#if defined(RNNCORE_HAVE_X86_KERNELS)
    if (name == "avx512") return &isa_avx512::table;
    if (name == "avx2") return &isa_avx2::table;
#endif
    if (name == isa_generic::table.name || name == "generic") return &isa_generic::table;
    return nullptr;
}

std::vector<std::string> built_isas() {
    std::vector<std::string> v;
#if defined(RNNCORE_HAVE_X86_KERNELS)
    v.push_back("avx512");
    v.push_back("avx2");
#endif
    v.push_back(isa_generic::table.name);
    return v;
}

const KernelTable* choose_initial() {
    const char* env = std::getenv("RNNCORE_ISA");
    if (env && *env) {
        std::string want(env);
        const KernelTable* t = table_for(want);
        if (t && cpu_has(want)) return t;
        // An unusable override falls back to detection; rnncore.info() shows the choice.
    }
    for (const auto& n : built_isas())
        if (cpu_has(n)) return table_for(n);
    return &isa_generic::table;
}

std::atomic<const KernelTable*>& active_ptr() {
    static std::atomic<const KernelTable*> p{choose_initial()};
    return p;
}

// AMX (cpu/amx.hpp): why the tile unit cannot be used, or "" where it can. Asked once: the CPU
// (AMX-TILE and AMX-BF16), the OS's tile state (XCR0) and Linux's per-process permission for
// it (arch_prctl ARCH_REQ_XCOMP_PERM), which is granted to the whole process.
const std::string& amx_unusable() {
    static const std::string why = [] {
#ifdef RNNCORE_AMX_PROBE
        unsigned a, b, c, d;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
            return std::string("this CPU has no AMX-BF16");
        if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return std::string("no OS support (OSXSAVE)");
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if ((lo & (3u << 17)) != (3u << 17)) return std::string("the OS does not enable the tile state");
        if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0)
            return std::string("the OS refused the tile state (arch_prctl)");
        return std::string();
#else
        return std::string("not in this build (x86-64 Linux with an assembler that knows AMX)");
#endif
    }();
    return why;
}

// 1: the float32 GEMMs use AMX where the AVX-512 kernels are active. Default on where usable;
// RNNCORE_AMX=0 in the environment switches it off, set_amx() at run time.
std::atomic<int>& amx_setting() {
    static std::atomic<int> on{[] {
        const char* env = std::getenv("RNNCORE_AMX");
        if (env && std::string(env) == "0") return 0;
        return amx_unusable().empty() ? 1 : 0;
    }()};
    return on;
}

}  // namespace

// Asked by the AVX-512 kernels only (the one unit that has the AMX GEMM), so only while they
// are the active ones.
bool amx_active() { return amx_setting().load(std::memory_order_relaxed) != 0; }

bool amx_enabled() { return amx_active(); }

void set_amx(bool on) {
    if (on && !amx_unusable().empty()) throw std::invalid_argument("amx: cannot be used: " + amx_unusable());
    amx_setting().store(on ? 1 : 0, std::memory_order_relaxed);
}

std::string amx_status() {
    if (!amx_unusable().empty()) return "not available: " + amx_unusable();
    if (!amx_enabled()) return "available, switched off";
    return std::string(active_kernels().name) == "avx512" ? "in use for the float32 matrix products"
                                                          : "on, but only with the avx512 kernels";
}

const KernelTable& active_kernels() { return *active_ptr().load(std::memory_order_acquire); }

std::string isa_name() { return active_kernels().name; }

std::string detected_isa() {
    for (const auto& n : built_isas())
        if (cpu_has(n)) return n;
    return isa_generic::table.name;
}

std::string available_isas() {
    std::string s;
    for (const auto& n : built_isas()) {
        if (!cpu_has(n)) continue;
        if (!s.empty()) s += ",";
        s += n;
    }
    return s;
}

void set_isa(const std::string& name) {
    const KernelTable* t = table_for(name);
    if (!t) {
        std::string all;
        for (const auto& n : built_isas()) all += (all.empty() ? "" : ", ") + n;
        throw std::invalid_argument("isa: expected one of " + all + ", got '" + name + "'");
    }
    if (!cpu_has(name))
        throw std::invalid_argument("isa: this CPU does not support '" + name +
                                    "' (available: " + available_isas() + ")");
    active_ptr().store(t, std::memory_order_release);
}

}  // namespace rnncore
