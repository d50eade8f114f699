// Portable kernels: the baseline of the target (SSE2 on x86_64, NEON on arm64, scalar
// elsewhere), compiled with no extra ISA flags.
#if defined(__aarch64__) || defined(__ARM_NEON)
#define RNNCORE_ISA_NAME "neon"
#else
#define RNNCORE_ISA_NAME "generic"
#endif
#define RNNCORE_ISA_NS isa_generic
#define RNNCORE_VEC_BYTES 16
#include "cpu/impl.hpp"
