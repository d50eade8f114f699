// Bindings of the runtime: version, threads, ISA, CUDA status.
#include <pybind11/pybind11.h>

#include "rnncore/runtime.hpp"

namespace py = pybind11;

void register_runtime(py::module_& m) {
    m.def("version", &rnncore::version);
    m.def("set_num_threads", &rnncore::set_num_threads, py::arg("n"));
    m.def("get_num_threads", &rnncore::get_num_threads);
    m.def("openmp_enabled", &rnncore::openmp_enabled);
    m.def("isa", &rnncore::isa_name, "The kernel ISA in use.");
    m.def("set_isa", &rnncore::set_isa, py::arg("name"),
          "Switch the kernels to another ISA this CPU supports (generic, avx2, avx512).");
    m.def("available_isas", &rnncore::available_isas);
    m.def("detected_isa", &rnncore::detected_isa);
    m.def("l2_cache_bytes", &rnncore::l2_cache_bytes,
          "One core's L2 cache in bytes as the kernels plan for it (RNNCORE_L2_BYTES overrides).");
    m.def("cuda_built", &rnncore::cuda_built);
    m.def("cuda_available", &rnncore::cuda_available);
    m.def("cuda_status", &rnncore::cuda_status);
}
