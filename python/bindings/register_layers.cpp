// Bindings of the layer stack: forward (inference and training) and backward.
//
// The Python layer passes C-contiguous arrays of the layer's dtype; every array is checked
// again here (dtype, contiguity, shape) so that no call into _core can read or write out of
// bounds, whatever it is given. Outputs are allocated while the GIL is held; the kernels
// then run with the GIL released: they touch only these buffers and the parameter arrays,
// which the caller's argument list keeps alive for the whole call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "rnncore/layer.hpp"
#include "rnncore/runtime.hpp"

namespace py = pybind11;
using namespace rnncore;

namespace {

// "(2, 3)", "(4,)": numpy's form. Plain string appends, no iostreams anywhere in the module:
// built with Ubuntu 24.04's GCC 13 (the GPU machine's toolchain), the module carried its own
// copy of libstdc++'s stream code beside the process's shared libstdc++, and formatting an
// integer through a string stream here crashed the process (a locale facet call landed in
// codecvt::do_unshift) on every shape error.
std::string shape_str(const std::vector<int64_t>& s) {
    std::string o = "(";
    for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
    if (s.size() == 1) o += ",";
    return o + ")";
}

std::vector<int64_t> shape_of(const py::array& a) {
    std::vector<int64_t> s(a.ndim());
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s[i] = a.shape(i);
    return s;
}

// An optional PackedWeights argument taken as a handle: given None, pybind11's caster for a
// PackedWeights* tried its foreign-module loader (hasattr on NoneType, an AttributeError
// formatted and dropped) at every call, ~0.5 us.
PackedWeights* optional_packed(py::handle h, const char* name) {
    if (h.is_none()) return nullptr;
    if (!py::isinstance<PackedWeights>(h))
        throw py::type_error(std::string(name) + ": expected PackedWeights or None, got " +
                             std::string(py::str(py::type::of(h).attr("__name__"))));
    return h.cast<PackedWeights*>();
}

template <class T> py::array_t<T> checked(py::handle obj, const std::string& name,
                                          const std::vector<int64_t>& shape) {
    if (!py::isinstance<py::array_t<T, py::array::c_style>>(obj))
        throw py::type_error(name + ": expected a C-contiguous " +
                             std::string(py::str(py::dtype::of<T>())) + " numpy array, got " +
                             std::string(py::str(py::type::of(obj))) +
                             (py::isinstance<py::array>(obj)
                                  ? " of dtype " + std::string(py::str(obj.attr("dtype")))
                                  : std::string()));
    auto a = py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(obj);
    bool same = a.ndim() == (py::ssize_t)shape.size();   // (no allocation on the way that passes)
    for (size_t i = 0; same && i < shape.size(); ++i) same = a.shape(i) == shape[i];
    if (!same)
        throw py::value_error(name + ": expected shape " + shape_str(shape) + ", got " +
                              shape_str(shape_of(a)));
    return a;
}

// An integer array (any integer dtype a safe cast takes to int64) as C-contiguous int64; else
// a TypeError: what, then the dtype received.
py::array_t<int64_t, py::array::c_style> int_ids(const py::array& a, const char* what) {
    const char kind = py::dtype(a.dtype()).kind();
    auto ids = py::array_t<int64_t, py::array::c_style>::ensure(a);
    if (!ids || (kind != 'i' && kind != 'u'))
        throw py::type_error(std::string(what) + ", got " + std::string(py::str(a.dtype())));
    return ids;
}

// Whether two C-contiguous arrays share memory (each spans [data, data + nbytes)).
bool overlap(const py::array& x, const py::array& y) {
    const char *x0 = static_cast<const char*>(x.data()), *y0 = static_cast<const char*>(y.data());
    return x.nbytes() > 0 && y.nbytes() > 0 && x0 < y0 + y.nbytes() && y0 < x0 + x.nbytes();
}

// matmul: out = op(a) @ op(b) + beta * out with rnncore's GEMM on its own threads. a and b
// (2-D, of the dtype T, any strides: a strided operand is copied) are checked before any work.
template <class T>
py::array matmul_t(const py::array& a_any, const py::array& b_any, bool ta, bool tb, const py::object& out,
                   double beta) {
    auto operand = [](const py::array& x, const char* name) {
        if (x.ndim() != 2)
            throw py::value_error(std::string(name) + ": expected a 2-D array, got " + std::to_string(x.ndim()) +
                                  " dimensions");
        return py::array_t<T, py::array::c_style>::ensure(x);   // (same dtype: a copy only if strided)
    };
    auto a = operand(a_any, "a"), b = operand(b_any, "b");
    const int64_t M = ta ? a.shape(1) : a.shape(0), K = ta ? a.shape(0) : a.shape(1);
    const int64_t Kb = tb ? b.shape(1) : b.shape(0), N = tb ? b.shape(0) : b.shape(1);
    if (K != Kb)
        throw py::value_error("b: expected " + std::to_string(K) + (tb ? " columns" : " rows") +
                              " (the inner dimension of a), got " + std::to_string(Kb));
    py::array_t<T> c;
    if (out.is_none()) {
        if (beta != 0.0) throw py::value_error("beta: expected 0 without out, got " + std::to_string(beta));
        c = py::array_t<T>({M, N});
    } else {
        c = checked<T>(out, "out", {M, N});
        if (!c.writeable()) throw py::value_error("out: array is read-only");
        if (overlap(a, c) || overlap(b, c)) throw py::value_error("out: expected memory of its own, got an array "
                                                              "that overlaps a or b");
    }
    {
        py::gil_scoped_release r;
        gemm<T>(ta, tb, M, N, K, T(1), a.data(), a.shape(1) > 0 ? a.shape(1) : 1, b.data(),
                b.shape(1) > 0 ? b.shape(1) : 1, (T)beta, c.mutable_data(), N > 0 ? N : 1);
    }
    return c;
}

struct Cache {
    LayerSpec spec;
    bool is_double = false;
    std::shared_ptr<StackCache<float>> f;
    std::shared_ptr<StackCache<double>> d;
    int64_t steps() const { return is_double ? cache_steps(*d) : cache_steps(*f); }
    int64_t batch() const { return is_double ? cache_batch(*d) : cache_batch(*f); }
};

template <class T>
std::vector<py::array_t<T>> take_params(const LayerSpec& s, const py::list& params,
                                        std::vector<DirParams<T>>* dp) {
    const auto info = param_info(s);
    if (py::len(params) != info.size())
        throw py::value_error("params: expected " + std::to_string(info.size()) + " arrays, got " +
                              std::to_string(py::len(params)));
    dp->assign(s.num_layers * s.dirs(), DirParams<T>{});
    std::vector<py::array_t<T>> keep;
    for (size_t i = 0; i < info.size(); ++i) {
        auto a = checked<T>(params[i], info[i].name, info[i].shape);
        keep.push_back(a);
        DirParams<T>& p = (*dp)[info[i].layer * s.dirs() + info[i].dir];
        const T* ptr = a.data();
        set_param(p, info[i].kind, ptr);
    }
    return keep;
}

template <class T>
py::tuple forward_t(const LayerSpec& s, const py::list& params, const py::array& x_any,
                    const py::object& h0, const py::object& c0, const py::object& lengths,
                    const py::object& masks, bool keep, PackedWeights* packed, Precision prec) {
    std::vector<DirParams<T>> dp;
    auto keep_params = take_params<T>(s, params, &dp);
    if (x_any.ndim() != 3)
        throw py::value_error("x: expected 3 dimensions (T, B, I), got " + std::to_string(x_any.ndim()));
    const int64_t TT = x_any.shape(0), B = x_any.shape(1);
    const int64_t L = s.num_layers, D = s.dirs(), H = s.hidden_size, P = s.out_size();
    auto x = checked<T>(x_any, "x", {TT, B, s.input_size});
    if (TT < 1) throw py::value_error("x: expected at least one time step, got shape " + shape_str(shape_of(x)));
    if (B < 1) throw py::value_error("x: expected a batch of at least one, got shape " + shape_str(shape_of(x)));
    ForwardArgs<T> a;
    a.steps = TT; a.batch = B; a.x = x.data();
    a.packed = packed;
    a.recurrent_precision = prec;
    py::array_t<T> h0a, c0a;
    py::array_t<int64_t> lena;
    if (!h0.is_none()) { h0a = checked<T>(h0, "h0", {L * D, B, P}); a.h0 = h0a.data(); }
    if (!c0.is_none()) {
        if (!s.is_lstm()) throw py::value_error("c0: only LSTM has a cell state");
        c0a = checked<T>(c0, "c0", {L * D, B, H});
        a.c0 = c0a.data();
    }
    if (!lengths.is_none()) {
        lena = checked<int64_t>(lengths, "lengths", {B});
        a.lengths = lena.data();
    }
    std::vector<py::array_t<T>> mask_keep;
    std::vector<const T*> mask_ptrs;
    if (!masks.is_none()) {
        py::list ml = masks;
        if ((int64_t)py::len(ml) != L - 1)
            throw py::value_error("dropout_masks: expected " + std::to_string(L - 1) + " masks, got " +
                                  std::to_string(py::len(ml)));
        for (auto m : ml) {
            mask_keep.push_back(checked<T>(m, "dropout_masks", {TT, B, D * P}));
            mask_ptrs.push_back(mask_keep.back().data());
        }
        if (L > 1) a.dropout_masks = mask_ptrs.data();
    }
    py::array_t<T> y({TT, B, D * P});
    py::array_t<T> hn({L * D, B, P});
    py::array_t<T> cn = s.is_lstm() ? py::array_t<T>({L * D, B, H}) : py::array_t<T>({(int64_t)0});
    ForwardOut<T> o;
    o.y = y.mutable_data(); o.h_n = hn.mutable_data();
    o.c_n = s.is_lstm() ? cn.mutable_data() : nullptr;
    std::shared_ptr<StackCache<T>> cache;
    {
        py::gil_scoped_release release;
        stack_forward<T>(s, dp, a, o, keep ? &cache : nullptr);
    }
    py::object cobj = py::none();
    if (keep) {
        auto c = std::make_shared<Cache>();
        c->spec = s;
        if constexpr (std::is_same<T, double>::value) { c->is_double = true; c->d = cache; }
        else { c->f = cache; }
        cobj = py::cast(c);
    }
    return py::make_tuple(y, hn, s.is_lstm() ? py::object(cn) : py::object(py::none()), cobj);
}

template <class T>
py::tuple backward_t(const LayerSpec& s, const py::list& params, const Cache& c,
                     const py::object& dy, const py::object& dhn, const py::object& dcn,
                     const py::list& grads, bool input_grad) {
    std::vector<DirParams<T>> dp;
    auto keep_params = take_params<T>(s, params, &dp);
    const int64_t TT = c.steps(), B = c.batch();
    const int64_t L = s.num_layers, D = s.dirs(), H = s.hidden_size, P = s.out_size();
    // The gradient arrays, checked like the parameters and required to be writeable.
    const auto info = param_info(s);
    if (py::len(grads) != info.size())
        throw py::value_error("grads: expected " + std::to_string(info.size()) + " arrays");
    std::vector<DirGrads<T>> dg(L * D);
    std::vector<py::array_t<T>> keep_grads;
    for (size_t i = 0; i < info.size(); ++i) {
        auto a = checked<T>(grads[i], "grads[" + info[i].name + "]", info[i].shape);
        if (!a.writeable()) throw py::value_error("grads[" + info[i].name + "]: array is read-only");
        keep_grads.push_back(a);
        DirGrads<T>& g = dg[info[i].layer * D + info[i].dir];
        T* ptr = a.mutable_data();
        set_param(g, info[i].kind, ptr);
    }
    BackwardArgs<T> a;
    py::array_t<T> dya, dhna, dcna;
    if (!dy.is_none()) { dya = checked<T>(dy, "dy", {TT, B, D * P}); a.dy = dya.data(); }
    if (!dhn.is_none()) { dhna = checked<T>(dhn, "dh_n", {L * D, B, P}); a.dh_n = dhna.data(); }
    if (!dcn.is_none() && s.is_lstm()) { dcna = checked<T>(dcn, "dc_n", {L * D, B, H}); a.dc_n = dcna.data(); }
    py::array_t<T> dx = input_grad ? py::array_t<T>({TT, B, s.input_size}) : py::array_t<T>({(int64_t)0});
    py::array_t<T> dh0({L * D, B, P});
    py::array_t<T> dc0 = s.is_lstm() ? py::array_t<T>({L * D, B, H}) : py::array_t<T>({(int64_t)0});
    BackwardOut<T> o;
    o.dx = input_grad ? dx.mutable_data() : nullptr; o.dh0 = dh0.mutable_data();
    o.dc0 = s.is_lstm() ? dc0.mutable_data() : nullptr;
    {
        py::gil_scoped_release release;
        if constexpr (std::is_same<T, double>::value) stack_backward<T>(s, dp, *c.d, a, o, dg);
        else stack_backward<T>(s, dp, *c.f, a, o, dg);
    }
    return py::make_tuple(input_grad ? py::object(dx) : py::object(py::none()), dh0,
                          s.is_lstm() ? py::object(dc0) : py::object(py::none()));
}

// The streaming fast path: holds the parameter arrays (updated in place by the Python
// layer, so the pointers stay valid and nothing is cached from their contents) and runs
// one step with almost no per-call work. step() returns None when its arguments are not
// already in the exact form it needs; the Python layer then takes the general path.
struct Stepper {
    LayerSpec spec;
    bool dbl = false;
    py::list keep;
    std::vector<DirParams<float>> pf;
    std::vector<DirParams<double>> pd;
    // A frozen layer's weights packed for the fused step kernels, at its first float32 step
    // (about the size of its weights: none for a frozen copy that never steps)
    bool frozen = false;
    std::once_flag packed_once;
    std::unique_ptr<StepPacks<float>> packs_f;
    std::unique_ptr<StepPacks<double>> packs_d;

    template <class T>
    static bool exact(py::handle o, int ndim, const int64_t* shape, bool writeable) {
        if (!py::isinstance<py::array_t<T, py::array::c_style>>(o)) return false;
        auto a = py::reinterpret_borrow<py::array>(o);
        if (a.ndim() != ndim || (writeable && !a.writeable())) return false;
        for (int i = 0; i < ndim; ++i)
            if (a.shape(i) != shape[i]) return false;
        return true;
    }

    // The layer's state as (h, c): for an LSTM a tuple of two (false for anything else), for
    // the others the state itself.
    bool split_state(py::handle state, py::handle& hs, py::handle& cs) const {
        if (!spec.is_lstm()) {
            hs = state;
            return true;
        }
        if (!py::isinstance<py::tuple>(state) || py::len(state) != 2) return false;
        hs = py::reinterpret_borrow<py::tuple>(state)[0];
        cs = py::reinterpret_borrow<py::tuple>(state)[1];
        return true;
    }

    // bf16: the layer's kept bfloat16 weights (inference_precision), or null (float32).
    template <class T> py::object run(py::handle x, py::handle state, PackedWeights* bf16 = nullptr) {
        const int64_t L = spec.num_layers, I = spec.input_size, H = spec.hidden_size, P = spec.out_size();
        if (!py::isinstance<py::array>(x)) return py::none();
        const int xd = py::reinterpret_borrow<py::array>(x).ndim();
        if (xd != 1 && xd != 2) return py::none();
        const int64_t B = xd == 1 ? 1 : py::reinterpret_borrow<py::array>(x).shape(0);
        const int64_t xs[2] = {xd == 1 ? I : B, I};
        if (B < 1 || !exact<T>(x, xd, xs, false)) return py::none();
        py::handle hs, cs;
        if (!split_state(state, hs, cs)) return py::none();
        if (!py::isinstance<py::array>(hs)) return py::none();
        const int sd = py::reinterpret_borrow<py::array>(hs).ndim();
        if (sd != 2 && sd != 3) return py::none();
        if (xd == 2 && sd != 3) return py::none();
        const int64_t hshape[3] = {L, sd == 3 ? B : P, P};
        const int64_t cshape[3] = {L, sd == 3 ? B : H, H};
        if (!exact<T>(hs, sd, hshape, true)) return py::none();
        if (spec.is_lstm() && !exact<T>(cs, sd, cshape, true)) return py::none();
        T* h = static_cast<T*>(py::reinterpret_borrow<py::array>(hs).mutable_data());
        T* c = spec.is_lstm() ? static_cast<T*>(py::reinterpret_borrow<py::array>(cs).mutable_data()) : nullptr;
        const T* xp = static_cast<const T*>(py::reinterpret_borrow<py::array>(x).data());
        py::array_t<T> y = xd == 1 ? py::array_t<T>(P) : py::array_t<T>({B, P});
        T* yp = y.mutable_data();
        {
            py::gil_scoped_release release;
            if (frozen && !bf16) {
                std::call_once(packed_once, [&] {
                    if constexpr (std::is_same<T, double>::value) packs_d = std::make_unique<StepPacks<double>>(spec, pd);
                    else packs_f = std::make_unique<StepPacks<float>>(spec, pf);
                });
            }
            if constexpr (std::is_same<T, double>::value) {
                if (packs_d) stack_step<T>(spec, pd, B, xp, h, c, yp, *packs_d);
                else stack_step<T>(spec, pd, B, xp, h, c, yp);
            } else if (packs_f && !bf16) {
                stack_step<T>(spec, pf, B, xp, h, c, yp, *packs_f);
            } else {
                stack_step<T>(spec, pf, B, xp, h, c, yp, bf16 ? Precision::BFloat16 : Precision::Float32, bf16);
            }
        }
        return py::make_tuple(y, py::reinterpret_borrow<py::object>(state));
    }

    // A whole sequence (inference) on the fast path: x (T, B, I) or unbatched (T, I) of the
    // layer's dtype, C-contiguous (batch_first: (1, T, I), one sequence); state None or the
    // layer's state (LSTM: a tuple (h0, c0), either None) in exactly the form the layer takes
    // (T and B at least one). Returns the layer's result, (y, h_n) or (y, (h_n, c_n)), or
    // None: the Python layer then takes the general path, which converts or refuses what it
    // was given. packed: the layer's kept packed weights (bfloat16 ones with bf16 set).
    template <class T> py::object sequence(py::handle x, py::handle state, PackedWeights* packed, bool bf16,
                                           bool batch_first) {
        const int64_t L = spec.num_layers, D = spec.dirs(), I = spec.input_size, H = spec.hidden_size,
                      P = spec.out_size();
        if (!py::isinstance<py::array_t<T, py::array::c_style>>(x)) return py::none();
        const auto xa = py::reinterpret_borrow<py::array>(x);
        const int xd = (int)xa.ndim();
        if (xd != 2 && xd != 3) return py::none();
        // batch-major (B, T, I): one sequence lies as (T, 1, I) does; more need the transpose
        const bool bmajor = batch_first && xd == 3;
        if (bmajor && xa.shape(0) != 1) return py::none();
        const int64_t TT = xa.shape(bmajor ? 1 : 0), B = xd == 3 ? xa.shape(bmajor ? 0 : 1) : 1;
        if (xa.shape(xd - 1) != I || TT < 1 || B < 1) return py::none();
        py::handle hs = py::none(), cs = py::none();
        if (!state.is_none() && !split_state(state, hs, cs)) return py::none();
        const int sd = xd;   // (L*D, B, width), or (L*D, width) for an unbatched x
        const int64_t hshape[3] = {L * D, xd == 3 ? B : P, P};
        const int64_t cshape[3] = {L * D, xd == 3 ? B : H, H};
        if (!hs.is_none() && !exact<T>(hs, sd, hshape, false)) return py::none();
        if (!cs.is_none() && !exact<T>(cs, sd, cshape, false)) return py::none();
        ForwardArgs<T> a;
        a.steps = TT; a.batch = B;
        a.x = static_cast<const T*>(xa.data());
        if (!hs.is_none()) a.h0 = static_cast<const T*>(py::reinterpret_borrow<py::array>(hs).data());
        if (!cs.is_none()) a.c0 = static_cast<const T*>(py::reinterpret_borrow<py::array>(cs).data());
        a.packed = packed;
        a.recurrent_precision = bf16 ? Precision::BFloat16 : Precision::Float32;
        py::array_t<T> y = bmajor ? py::array_t<T>({B, TT, D * P})
                           : xd == 3 ? py::array_t<T>({TT, B, D * P}) : py::array_t<T>({TT, D * P});
        py::array_t<T> hn = xd == 3 ? py::array_t<T>({L * D, B, P}) : py::array_t<T>({L * D, P});
        py::array_t<T> cn;
        ForwardOut<T> o;
        o.y = y.mutable_data(); o.h_n = hn.mutable_data();
        if (spec.is_lstm()) {
            cn = xd == 3 ? py::array_t<T>({L * D, B, H}) : py::array_t<T>({L * D, H});
            o.c_n = cn.mutable_data();
        }
        {
            py::gil_scoped_release release;
            if constexpr (std::is_same<T, double>::value) stack_forward<T>(spec, pd, a, o, nullptr);
            else stack_forward<T>(spec, pf, a, o, nullptr);
        }
        if (spec.is_lstm()) return py::make_tuple(y, py::make_tuple(hn, cn));
        return py::make_tuple(y, hn);
    }
};

}  // namespace

void register_layers(py::module_& m) {
    py::enum_<CellType>(m, "CellType")
        .value("RNN_TANH", CellType::RNN_TANH)
        .value("RNN_RELU", CellType::RNN_RELU)
        .value("LSTM", CellType::LSTM)
        .value("GRU", CellType::GRU);

    py::class_<LayerSpec>(m, "LayerSpec")
        .def(py::init([](CellType cell, int64_t input_size, int64_t hidden_size, int64_t num_layers,
                         int64_t proj_size, bool bias, bool bidirectional, bool peephole,
                         bool coupled_gates, bool linear_before_reset) {
                 LayerSpec s;
                 s.cell = cell; s.input_size = input_size; s.hidden_size = hidden_size;
                 s.num_layers = num_layers; s.proj_size = proj_size; s.bias = bias;
                 s.bidirectional = bidirectional; s.peephole = peephole;
                 s.coupled_gates = coupled_gates; s.linear_before_reset = linear_before_reset;
                 s.validate();
                 return s;
             }),
             py::arg("cell"), py::arg("input_size"), py::arg("hidden_size"), py::arg("num_layers") = 1,
             py::arg("proj_size") = 0, py::arg("bias") = true, py::arg("bidirectional") = false,
             py::arg("peephole") = false, py::arg("coupled_gates") = false,
             py::arg("linear_before_reset") = true)
        .def_readonly("cell", &LayerSpec::cell)
        .def_readonly("input_size", &LayerSpec::input_size)
        .def_readonly("hidden_size", &LayerSpec::hidden_size)
        .def_readonly("num_layers", &LayerSpec::num_layers)
        .def_readonly("proj_size", &LayerSpec::proj_size)
        .def_readonly("bias", &LayerSpec::bias)
        .def_readonly("bidirectional", &LayerSpec::bidirectional)
        .def_readonly("peephole", &LayerSpec::peephole)
        .def_readonly("coupled_gates", &LayerSpec::coupled_gates)
        .def_readonly("linear_before_reset", &LayerSpec::linear_before_reset)
        .def_property_readonly("gates", &LayerSpec::gates)
        .def_property_readonly("out_size", &LayerSpec::out_size)
        .def("param_info", [](const LayerSpec& s) {
            py::list out;
            for (const auto& p : param_info(s))
                out.append(py::make_tuple(p.name, py::tuple(py::cast(p.shape)), p.layer, p.dir, p.kind));
            return out;
        });

    py::class_<PackedWeights>(m, "PackedWeights",
                              "Packed recurrent weights kept across forward calls; every call "
                              "checks them against a content hash of the weights and repacks "
                              "what changed. trusted=True (a frozen layer's: weights that can "
                              "never change) checks only their address and the layout.")
        .def(py::init([](bool trusted) { return new PackedWeights(trusted); }), py::arg("trusted") = false)
        .def_property_readonly("trusted", &PackedWeights::trusted)
        .def_property_readonly("nbytes", &PackedWeights::bytes, "memory held, in bytes")
        .def_property_readonly("packs", &PackedWeights::packs,
                               "thread slices packed so far; a call that reuses them adds none")
        .def("clear", &PackedWeights::clear, "frees the packed copies (the next call packs again)");

    py::class_<Cache, std::shared_ptr<Cache>>(m, "ForwardCache")
        .def_property_readonly("steps", &Cache::steps)
        .def_property_readonly("batch", &Cache::batch);

    m.def("forward",
          [](const LayerSpec& s, const py::list& params, const py::array& x, const py::object& h0,
             const py::object& c0, const py::object& lengths, const py::object& masks, bool keep,
             py::handle packed_arg, const std::string& precision) {
              PackedWeights* packed = optional_packed(packed_arg, "packed");
              Precision prec;
              if (precision == "float32") prec = Precision::Float32;
              else if (precision == "bfloat16") prec = Precision::BFloat16;
              else throw py::value_error("recurrent_precision: expected 'float32' or 'bfloat16', got '" +
                                         precision + "'");
              if (x.dtype().equal(py::dtype::of<double>()))
                  return forward_t<double>(s, params, x, h0, c0, lengths, masks, keep, packed, prec);
              return forward_t<float>(s, params, x, h0, c0, lengths, masks, keep, packed, prec);
          },
          py::arg("spec"), py::arg("params"), py::arg("x"), py::arg("h0") = py::none(),
          py::arg("c0") = py::none(), py::arg("lengths") = py::none(),
          py::arg("dropout_masks") = py::none(), py::arg("keep") = false,
          py::arg("packed") = py::none(), py::arg("recurrent_precision") = "float32",
          "Run the stack. x: (T, B, I). Returns (y, h_n, c_n or None, cache or None). packed: a "
          "PackedWeights kept by the caller, so the recurrent weights are packed once and "
          "reused while their content is unchanged. recurrent_precision: 'float32', or "
          "'bfloat16' (inference of a float32 stack: W_hh and W_hr rounded to bfloat16).");

    m.def("backward",
          [](const LayerSpec& s, const py::list& params, const Cache& c, const py::object& dy,
             const py::object& dhn, const py::object& dcn, const py::list& grads, bool input_grad) {
              if (s != c.spec)
                  throw py::value_error("cache: it was made by a layer of another configuration");
              if (c.is_double) return backward_t<double>(s, params, c, dy, dhn, dcn, grads, input_grad);
              return backward_t<float>(s, params, c, dy, dhn, dcn, grads, input_grad);
          },
          py::arg("spec"), py::arg("params"), py::arg("cache"), py::arg("dy") = py::none(),
          py::arg("dh_n") = py::none(), py::arg("dc_n") = py::none(), py::arg("grads") = py::list(),
          py::arg("input_grad") = true,
          "Backpropagation through time. Returns (dx or None where input_grad is false, dh0, dc0 or "
          "None); grads accumulate. input_grad=False skips the first layer's input-gradient GEMM.");

    py::class_<Stepper>(m, "Stepper")
        .def(py::init([](const LayerSpec& s, const py::list& params, bool dbl, bool frozen) {
                 auto st = std::make_unique<Stepper>();
                 st->spec = s;
                 st->dbl = dbl;
                 st->keep = params;
                 if (dbl) take_params<double>(s, params, &st->pd);
                 else take_params<float>(s, params, &st->pf);
                 st->frozen = frozen;
                 return st;
             }),
             py::arg("spec"), py::arg("params"), py::arg("is_double"), py::arg("frozen") = false,
             "frozen: the parameters never change (read-only arrays kept here): the float32 "
             "steps read a copy packed at the first of them for the fused step kernels")
        .def_property_readonly("packed_bytes", [](const Stepper& st) {
            return st.packs_f ? st.packs_f->bytes() : st.packs_d ? st.packs_d->bytes() : int64_t(0);
        })
        .def("step",
             [](Stepper& st, py::handle x, py::handle state, py::handle bf16_packed) -> py::object {
                 PackedWeights* bf16 = optional_packed(bf16_packed, "bf16_packed");   // (~10% of a step)
                 if (bf16 && st.dbl) throw py::value_error("bf16_packed: bfloat16 weights need a float32 layer");
                 if (st.spec.bidirectional) return py::none();   // (the layer refuses it)
                 return st.dbl ? st.run<double>(x, state) : st.run<float>(x, state, bf16);
             },
             py::arg("x"), py::arg("state"), py::arg("bf16_packed") = py::none(),
             "One step; updates the state arrays in place. None when the arguments need the general "
             "path (or the layer is bidirectional). bf16_packed: the layer's PackedWeights for "
             "bfloat16 recurrent weights.")
        .def("sequence",
             [](Stepper& st, py::handle x, py::handle state, py::handle packed, bool bf16, bool batch_first) {
                 PackedWeights* pw = optional_packed(packed, "packed");
                 if (bf16 && st.dbl) throw py::value_error("bfloat16: bfloat16 weights need a float32 layer");
                 return st.dbl ? st.sequence<double>(x, state, pw, false, batch_first)
                               : st.sequence<float>(x, state, pw, bf16, batch_first);
             },
             py::arg("x"), py::arg("state"), py::arg("packed"), py::arg("bfloat16") = false,
             py::arg("batch_first") = false,
             "Inference over a whole sequence, the layer's call without its conversions: returns "
             "(y, h_n) or (y, (h_n, c_n)), or None when the arguments need the general path. "
             "packed: the layer's PackedWeights (its bfloat16 ones with bfloat16=True). "
             "batch_first: x is (B, T, I) (only B=1 on this path).");

    m.def("release_memory", &rnncore::release_memory,
          "Frees the buffers the core keeps between calls (inference's activations, the backward's "
          "gradient buffers, a spare training cache): this thread's now, every other thread's at "
          "the start of its next call.");
    m.def("kept_memory", &rnncore::kept_memory_bytes,
          "Bytes of the buffers the core keeps between calls for this thread.");
    m.def("activations",
          [](py::array_t<float, py::array::c_style | py::array::forcecast> x, int which) {
              py::array_t<float> y(x.size());
              fast_activation(which, x.size(), x.data(), y.mutable_data());
              return y;
          },
          py::arg("x"), py::arg("which"), "The float32 sigmoid (0) or tanh (1) of the active ISA (tests).");
    m.def("read_bandwidth",
          [](int64_t bytes, int reps) {
              py::gil_scoped_release r;
              return read_bandwidth(bytes, reps);
          },
          py::arg("bytes"), py::arg("reps"), "GB/s read by one thread from a buffer of that size.");
    m.def("round_trip_ns",
          [](int rounds) {
              py::gil_scoped_release r;
              return thread_round_trip_ns(rounds);
          },
          py::arg("rounds"),
          "ns of one round trip between two threads of the kernels' team through a cache line "
          "(NaN with fewer than two threads).");

    m.def("gemm",
          [](py::array_t<float, py::array::c_style> a, py::array_t<float, py::array::c_style> b,
             bool ta, bool tb) {
              if (a.ndim() != 2 || b.ndim() != 2) throw py::value_error("gemm: expected 2-D arrays");
              const int64_t M = ta ? a.shape(1) : a.shape(0), K = ta ? a.shape(0) : a.shape(1);
              const int64_t Kb = tb ? b.shape(1) : b.shape(0), N = tb ? b.shape(0) : b.shape(1);
              if (K != Kb) throw py::value_error("gemm: inner dimensions differ");
              py::array_t<float> c({M, N});
              {
                  py::gil_scoped_release r;
                  gemm<float>(ta, tb, M, N, K, 1.f, a.data(), a.shape(1), b.data(), b.shape(1), 0.f,
                              c.mutable_data(), N);
              }
              return c;
          },
          py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false,
          "C = op(a) @ op(b) with rnncore's GEMM (float32; for tests and benchmarks).");
    m.def("matmul",
          [](const py::array& a, const py::array& b, bool ta, bool tb, const py::object& out, double beta) {
              const bool f64 = a.dtype().equal(py::dtype::of<double>());
              if (!f64 && !a.dtype().equal(py::dtype::of<float>()))
                  throw py::type_error("a: expected float32 or float64, got " + std::string(py::str(a.dtype())));
              if (!b.dtype().equal(a.dtype()))
                  throw py::type_error("b: expected " + std::string(py::str(a.dtype())) + " (the dtype of a), got " +
                                       std::string(py::str(b.dtype())));
              return f64 ? matmul_t<double>(a, b, ta, tb, out, beta) : matmul_t<float>(a, b, ta, tb, out, beta);
          },
          py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false,
          py::arg("out") = py::none(), py::arg("beta") = 0.0,
          "out = op(a) @ op(b) + beta * out (float32 or float64, a new array without out) with rnncore's "
          "GEMM on its own threads: the Dense block and the optimizers use it instead of NumPy's BLAS, "
          "whose idle threads spin on the cores rnncore's kernels run on.");
    m.def("sum_squares",
          [](const py::list& arrays) {
              // the squared L2 norm of all the arrays (float32 or float64), summed in float64
              std::vector<py::array> keep;
              for (size_t i = 0; i < arrays.size(); ++i) {
                  if (!py::isinstance<py::array>(arrays[i]))
                      throw py::type_error("arrays[" + std::to_string(i) + "]: expected a numpy array");
                  py::array x = py::reinterpret_borrow<py::array>(arrays[i]);
                  if (!x.dtype().equal(py::dtype::of<float>()) && !x.dtype().equal(py::dtype::of<double>()))
                      throw py::type_error("arrays[" + std::to_string(i) + "]: expected float32 or float64, got " +
                                           std::string(py::str(x.dtype())));
                  keep.push_back(x.dtype().equal(py::dtype::of<float>())
                                     ? py::array(py::array_t<float, py::array::c_style>::ensure(x))
                                     : py::array(py::array_t<double, py::array::c_style>::ensure(x)));
              }
              double total = 0;
              {
                  py::gil_scoped_release r;
                  for (const py::array& x : keep)
                      total += x.itemsize() == 4 ? sum_squares<float>(x.size(), static_cast<const float*>(x.data()))
                                                 : sum_squares<double>(x.size(), static_cast<const double*>(x.data()));
              }
              return total;
          },
          py::arg("arrays"), "The sum of the squares of every element of the arrays, in float64.");
    m.def("adam_update",
          [](const py::array& p, const py::array& g, const py::array& m, const py::array& v, double lr, double b1,
             double b2, double eps, double weight_decay, bool decoupled, int64_t step) {
              auto run = [&](auto tag) {   // (step >= 1: checked by the core before any work)
                  using T = decltype(tag);
                  const std::vector<int64_t> shape = shape_of(p);
                  auto pa = checked<T>(p, "param", shape);
                  auto ga = checked<T>(g, "grad", shape);
                  auto ma = checked<T>(m, "exp_avg", shape);
                  auto va = checked<T>(v, "exp_avg_sq", shape);
                  for (const auto* a : {&pa, &ma, &va})
                      if (!a->writeable()) throw py::value_error("adam_update: a read-only array");
                  const py::array all[4] = {pa, ga, ma, va};   // (the kernel reads them as restrict)
                  for (int i = 0; i < 4; ++i)
                      for (int k = i + 1; k < 4; ++k)
                          if (overlap(all[i], all[k]))
                              throw py::value_error("adam_update: param, grad, exp_avg and exp_avg_sq must not "
                                                    "share memory");
                  T* pp = pa.mutable_data();
                  const T* gp = ga.data();
                  T* mp = ma.mutable_data();
                  T* vp = va.mutable_data();
                  const int64_t n = pa.size();
                  py::gil_scoped_release rel;
                  adam_update<T>(n, pp, gp, mp, vp, lr, b1, b2, eps, weight_decay, decoupled, step);
              };
              if (p.dtype().equal(py::dtype::of<double>())) run(double());
              else run(float());
          },
          py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
          py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"),
          py::arg("step"),
          "One Adam (AdamW: decoupled) step in place: param, exp_avg and exp_avg_sq updated from grad "
          "(C-contiguous arrays of one float dtype and shape).");
    m.def("softmax_xent",
          [](const py::array& z, const py::array& t_any, const py::array& w) {
              if (z.ndim() != 2) throw py::value_error("logits: expected a 2-D array (rows, classes)");
              const bool f64 = z.dtype().equal(py::dtype::of<double>());
              if (!f64 && !z.dtype().equal(py::dtype::of<float>()))
                  throw py::type_error("logits: expected float32 or float64, got " + std::string(py::str(z.dtype())));
              auto t = int_ids(t_any, "targets: expected integer class ids");
              const int64_t R = z.shape(0), C = z.shape(1);
              if (t.ndim() != 1 || t.shape(0) != R)
                  throw py::value_error("targets: expected shape (" + std::to_string(R) + ",), got " +
                                        shape_str(shape_of(t)));
              auto run = [&](auto tag) -> py::tuple {
                  using T = decltype(tag);
                  auto za = py::array_t<T, py::array::c_style>::ensure(z);
                  auto wa = checked<T>(w, "weights", {R});
                  py::array_t<T> g({R, C});
                  double loss;
                  {
                      const T* zp = za.data();
                      const int64_t* tp = t.data();
                      const T* wp = wa.data();
                      T* gp = g.mutable_data();
                      py::gil_scoped_release rel;
                      loss = softmax_cross_entropy<T>(R, C, zp, tp, wp, gp);
                  }
                  return py::make_tuple(loss, g);
              };
              return f64 ? run(double()) : run(float());
          },
          py::arg("logits"), py::arg("targets"), py::arg("weights"),
          "Softmax cross-entropy of rows: (sum_r w_r (logsumexp(z_r) - z_r[t_r]), the gradient "
          "w_r (softmax(z_r) - onehot(t_r))), one pass a row with the kernels' exp.");
    m.def("scatter_add_rows",
          [](const py::array& out, const py::array& ids_any, const py::array& rows) {
              // out[ids[k]] += rows[k]: the gradient of an embedding lookup (np.add.at)
              auto ids = int_ids(ids_any, "ids: expected an integer array");
              if (out.ndim() != 2) throw py::value_error("out: expected a 2-D array");
              const int64_t V = out.shape(0), E = out.shape(1), n = ids.size();
              auto run = [&](auto tag) {
                  using T = decltype(tag);
                  auto o = checked<T>(out, "out", {V, E});
                  if (!o.writeable()) throw py::value_error("out: array is read-only");
                  auto r = checked<T>(rows, "rows", {n, E});
                  T* op = o.mutable_data();
                  const T* rp = r.data();
                  const int64_t* id = ids.data();
                  py::gil_scoped_release rel;
                  scatter_add_rows<T>(V, E, op, n, id, rp);   // (ids checked before any row is added)
              };
              if (out.dtype().equal(py::dtype::of<double>())) run(double());
              else run(float());
          },
          py::arg("out"), py::arg("ids"), py::arg("rows"),
          "out[ids[k]] += rows[k] for every k (out: (V, E); rows: (len(ids), E), its dtype).");
}
