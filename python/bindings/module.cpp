// The private extension module rnncore._core; python/rnncore re-exports what users need.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_layers(py::module_& m);
void register_runtime(py::module_& m);
void register_classic(py::module_& m);

PYBIND11_MODULE(_core, m) {
    m.doc() = "rnncore C++ core (private: use the rnncore package)";
    register_runtime(m);
    register_layers(m);
    register_classic(m);
}
