// AVX-512 kernels (compiled with -mavx512f/bw/dq/vl; chosen at run time only on CPUs that have them).
#define RNNCORE_ISA_NAME "avx512"
#define RNNCORE_ISA_NS isa_avx512
#define RNNCORE_VEC_BYTES 64
#include "cpu/impl.hpp"
