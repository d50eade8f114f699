// Run-time choice of the kernel ISA: detected once from the CPU, overridable with the
// environment variable RNNCORE_ISA or set_isa(). See kernels.hpp.
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.hpp"
#include "rnncore/runtime.hpp"

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

}  // namespace

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
