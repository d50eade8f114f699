// Bindings of the runtime: version, threads, ISA, CUDA status.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

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
    m.def("amx_enabled", &rnncore::amx_enabled,
          "Whether the float32 GEMMs of the avx512 kernels use AMX (bf16x6, float32 accuracy).");
    m.def("set_amx", &rnncore::set_amx, py::arg("on"),
          "Switch the AMX GEMM on or off (RNNCORE_AMX=0 in the environment: off from the start).");
    m.def("amx_status", &rnncore::amx_status);
    m.def("l2_cache_bytes", &rnncore::l2_cache_bytes,
          "One core's L2 cache in bytes as the kernels plan for it (RNNCORE_L2_BYTES overrides).");
    m.def("phase_timing", &rnncore::phase_timing,
          "Whether the kernels time their phases (RNNCORE_PHASES=1 in the environment, read once).");
    m.def("phase_times", [](bool reset) {
              py::dict d;
              const auto times = rnncore::phase_times(reset);
              const auto names = rnncore::phase_names();
              for (size_t i = 0; i < times.size(); ++i) d[py::str(names[i])] = py::cast(times[i]);
              return d;
          }, py::arg("reset") = true,
          "Seconds per phase of the recurrence kernels, per team thread, since the last reset "
          "({} unless RNNCORE_PHASES=1).");
    m.def("idle_projection", &rnncore::idle_projection,
          "The idle core's input projection: -1 auto (by measured time), 0 off, 1 on.");
    m.def("set_idle_projection", &rnncore::set_idle_projection, py::arg("mode"),
          "Set the idle core's input projection: -1 auto, 0 off, 1 on (where it applies).");
    m.def("idle_projection_runs", &rnncore::idle_projection_runs,
          "Forward calls that projected their input on the idle core since the process started.");
    m.def("spread_projection", &rnncore::spread_projection,
          "Batch 1: whether the next block's input projection runs beside each step's product.");
    m.def("set_spread_projection", &rnncore::set_spread_projection, py::arg("on"),
          "Batch 1: the next block's input projection beside each step's product (True, the "
          "default) or a block at a time (False); the results are the same bit for bit.");
    m.def("spread_projection_runs", &rnncore::spread_projection_runs,
          "Forward calls (a count per layer direction's thread) that spread the projection.");
    m.def("small_team", &rnncore::small_team,
          "A team of two for the small layers: -1 auto (by measured time), 0 never, 1 always.");
    m.def("set_small_team", &rnncore::set_small_team, py::arg("mode"),
          "Set the team of two for the small layers: -1 auto, 0 never, 1 always (where it applies).");
    m.def("small_team_runs", &rnncore::small_team_runs,
          "Forward calls of a small layer that ran a team of two since the process started.");
    m.def("layer_pipeline_runs", &rnncore::layer_pipeline_runs,
          "Forward calls (inference or training) of a multi-layer stack that ran its layers at "
          "once (the layer pipeline) since the process started.");
    m.def("layer_pipeline_backward_runs", &rnncore::layer_pipeline_backward_runs,
          "Backward calls of a multi-layer stack that ran its layers at once since the process "
          "started.");
    m.def("exchange_status", [] {
              const auto v = rnncore::exchange_status();
              py::dict d;
              d["state"] = v[0] == 2 ? "measured" : v[0] == 1 ? "measuring" : "unmeasured";
              d["chosen"] = std::vector<int64_t>{v[1], v[2]};
              d["uses"] = v[3];
              d["round_trip_ns"] = std::vector<int64_t>(v.begin() + 4, v.end());
              return d;
          },
          "The exchange pages of a recurrence team of two (the page, or two, through which its "
          "threads pass the state h at every step, picked by measured round trips between them): "
          "the state, the two fastest candidate pages, the calls that used them and each "
          "candidate's round trip in ns.");
    m.def("cuda_built", &rnncore::cuda_built);
    m.def("cuda_available", &rnncore::cuda_available);
    m.def("cuda_status", &rnncore::cuda_status);
}
