// AVX2 + FMA kernels (compiled with -mavx2 -mfma; chosen at run time only on CPUs that have them).
#define RNNCORE_ISA_NAME "avx2"
#define RNNCORE_ISA_NS isa_avx2
#define RNNCORE_VEC_BYTES 32
#include "cpu/impl.hpp"
