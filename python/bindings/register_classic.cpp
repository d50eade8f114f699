// Bindings of the classic algorithms: Hopfield networks, second-order RNNs, RTRL.
// Same rules as register_layers.cpp: every array is checked here, kernels run without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "rnncore/classic.hpp"

namespace py = pybind11;
using namespace rnncore;

namespace {

template <class T> using CArr = py::array_t<T, py::array::c_style>;

template <class T> CArr<T> need(py::handle o, const std::string& name, const std::vector<int64_t>& shape,
                                bool writeable = false) {
    if (!py::isinstance<CArr<T>>(o))
        throw py::type_error(name + ": expected a C-contiguous " + std::string(py::str(py::dtype::of<T>())) +
                             " array");
    auto a = py::reinterpret_borrow<CArr<T>>(o);
    std::vector<int64_t> s(a.ndim());
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s[i] = a.shape(i);
    if (s != shape) {
        auto fmt = [](const std::vector<int64_t>& v) {
            std::string r = "(";
            for (size_t i = 0; i < v.size(); ++i) r += (i ? ", " : "") + std::to_string(v[i]);
            return r + (v.size() == 1 ? ",)" : ")");
        };
        throw py::value_error(name + ": expected shape " + fmt(shape) + ", got " + fmt(s));
    }
    if (writeable && !a.writeable()) throw py::value_error(name + ": array is read-only");
    return a;
}

struct SOCache {
    bool dbl = false;
    std::shared_ptr<SecondOrderCache<float>> f;
    std::shared_ptr<SecondOrderCache<double>> d;
};

template <class T>
SecondOrderParams<T> so_params(int64_t I, int64_t H, int64_t r, const py::list& params, std::vector<CArr<T>>* keep) {
    SecondOrderParams<T> p;
    p.input_size = I; p.hidden_size = H; p.rank = r;
    if (r == 0) {
        if (py::len(params) != 2) throw py::value_error("params: expected [weight, bias]");
        keep->push_back(need<T>(params[0], "weight", {H, H, I}));
        keep->push_back(need<T>(params[1], "bias", {H}));
        p.w = (*keep)[0].data(); p.b = (*keep)[1].data();
    } else {
        if (py::len(params) != 5) throw py::value_error("params: expected [weight_fx, weight_fh, weight_hf, weight_hx, bias]");
        keep->push_back(need<T>(params[0], "weight_fx", {r, I}));
        keep->push_back(need<T>(params[1], "weight_fh", {r, H}));
        keep->push_back(need<T>(params[2], "weight_hf", {H, r}));
        keep->push_back(need<T>(params[3], "weight_hx", {H, I}));
        keep->push_back(need<T>(params[4], "bias", {H}));
        p.w_fx = (*keep)[0].data(); p.w_fh = (*keep)[1].data(); p.w_hf = (*keep)[2].data();
        p.w_hx = (*keep)[3].data(); p.b = (*keep)[4].data();
    }
    return p;
}

template <class T>
py::tuple so_forward(int64_t I, int64_t H, int64_t r, const py::list& params, const py::array& xa,
                     const py::object& h0, const py::object& lengths, bool keep) {
    std::vector<CArr<T>> kp;
    auto p = so_params<T>(I, H, r, params, &kp);
    if (xa.ndim() != 3) throw py::value_error("x: expected (T, B, I)");
    const int64_t TT = xa.shape(0), B = xa.shape(1);
    auto x = need<T>(xa, "x", {TT, B, I});
    CArr<T> h0a;
    CArr<int64_t> la;
    if (!h0.is_none()) h0a = need<T>(h0, "h0", {B, H});
    if (!lengths.is_none()) la = need<int64_t>(lengths, "lengths", {B});
    CArr<T> y({TT, B, H}), hn({B, H});
    std::shared_ptr<SecondOrderCache<T>> c;
    {
        py::gil_scoped_release rel;
        second_order_forward<T>(p, TT, B, x.data(), h0.is_none() ? nullptr : h0a.data(),
                                lengths.is_none() ? nullptr : la.data(), y.mutable_data(),
                                hn.mutable_data(), keep ? &c : nullptr);
    }
    py::object co = py::none();
    if (keep) {
        auto sc = std::make_shared<SOCache>();
        if constexpr (std::is_same<T, double>::value) { sc->dbl = true; sc->d = c; }
        else sc->f = c;
        co = py::cast(sc);
    }
    return py::make_tuple(y, hn, co);
}

template <class T>
py::tuple so_backward(int64_t I, int64_t H, int64_t r, const py::list& params, const SOCache& sc,
                      const py::object& dy, const py::object& dhn, const py::list& grads,
                      bool input_grad) {
    std::vector<CArr<T>> kp;
    auto p = so_params<T>(I, H, r, params, &kp);
    const SecondOrderCache<T>& c = [&]() -> const SecondOrderCache<T>& {
        if constexpr (std::is_same<T, double>::value) return *sc.d; else return *sc.f;
    }();
    const int64_t TT = second_order_cache_steps(c), B = second_order_cache_batch(c);
    std::vector<CArr<T>> kg;
    SecondOrderGrads<T> g;
    if (r == 0) {
        if (py::len(grads) != 2) throw py::value_error("grads: expected 2 arrays");
        kg.push_back(need<T>(grads[0], "grads[weight]", {H, H, I}, true));
        kg.push_back(need<T>(grads[1], "grads[bias]", {H}, true));
        g.w = kg[0].mutable_data(); g.b = kg[1].mutable_data();
    } else {
        if (py::len(grads) != 5) throw py::value_error("grads: expected 5 arrays");
        kg.push_back(need<T>(grads[0], "grads[weight_fx]", {r, I}, true));
        kg.push_back(need<T>(grads[1], "grads[weight_fh]", {r, H}, true));
        kg.push_back(need<T>(grads[2], "grads[weight_hf]", {H, r}, true));
        kg.push_back(need<T>(grads[3], "grads[weight_hx]", {H, I}, true));
        kg.push_back(need<T>(grads[4], "grads[bias]", {H}, true));
        g.w_fx = kg[0].mutable_data(); g.w_fh = kg[1].mutable_data(); g.w_hf = kg[2].mutable_data();
        g.w_hx = kg[3].mutable_data(); g.b = kg[4].mutable_data();
    }
    CArr<T> dya, dhna;
    if (!dy.is_none()) dya = need<T>(dy, "dy", {TT, B, H});
    if (!dhn.is_none()) dhna = need<T>(dhn, "dh_n", {B, H});
    CArr<T> dx(input_grad ? std::vector<int64_t>{TT, B, I} : std::vector<int64_t>{0}), dh0({B, H});
    {
        py::gil_scoped_release rel;
        second_order_backward<T>(p, c, dy.is_none() ? nullptr : dya.data(),
                                 dhn.is_none() ? nullptr : dhna.data(), input_grad ? dx.mutable_data() : nullptr,
                                 dh0.mutable_data(), g);
    }
    return py::make_tuple(input_grad ? py::object(dx) : py::object(py::none()), dh0);
}

template <class T>
void rtrl_t(const LayerSpec& s, const py::list& params, const py::array& x, const py::array& h,
            const py::object& c, const py::array& P) {
    const int64_t I = s.input_size, H = s.hidden_size, GH = s.gates() * H;
    const int64_t S = rtrl_state_size(s), NT = rtrl_param_count(s);
    std::vector<CArr<T>> keep;
    DirParams<T> w;
    const size_t want = s.bias ? 4 : 2;
    if (py::len(params) != want) throw py::value_error("params: expected " + std::to_string(want) + " arrays");
    keep.push_back(need<T>(params[0], "weight_ih_l0", {GH, I}));
    keep.push_back(need<T>(params[1], "weight_hh_l0", {GH, H}));
    w.w_ih = keep[0].data(); w.w_hh = keep[1].data();
    if (s.bias) {
        keep.push_back(need<T>(params[2], "bias_ih_l0", {GH}));
        keep.push_back(need<T>(params[3], "bias_hh_l0", {GH}));
        w.b_ih = keep[2].data(); w.b_hh = keep[3].data();
    }
    auto xa = need<T>(x, "x_t", {I});
    auto ha = need<T>(h, "h", {H}, true);
    CArr<T> ca;
    if (s.is_lstm()) ca = need<T>(c, "c", {H}, true);
    auto Pa = need<T>(P, "P", {S, NT}, true);
    py::gil_scoped_release rel;
    rtrl_step<T>(s, w, xa.data(), ha.mutable_data(), s.is_lstm() ? ca.mutable_data() : nullptr,
                 Pa.mutable_data());
}

}  // namespace

void register_classic(py::module_& m) {
    m.def("hopfield_store",
          [](CArr<double> W, CArr<double> patterns, int rule) {
              if (W.ndim() != 2 || W.shape(0) != W.shape(1)) throw py::value_error("W: expected (N, N)");
              const int64_t n = W.shape(0);
              if (patterns.ndim() != 2 || patterns.shape(1) != n)
                  throw py::value_error("patterns: expected (P, " + std::to_string(n) + ")");
              if (rule != 0 && rule != 1) throw py::value_error("rule: expected 0 (hebbian) or 1 (storkey)");
              if (!W.writeable()) throw py::value_error("W: array is read-only");
              double* w = W.mutable_data();
              const double* p = patterns.data();
              const int64_t P = patterns.shape(0);
              py::gil_scoped_release rel;
              hopfield_store(n, w, p, P, (HopfieldRule)rule);
          },
          py::arg("W").noconvert(), py::arg("patterns").noconvert(), py::arg("rule"));
    m.def("hopfield_recall",
          [](CArr<double> W, CArr<double> state, int mode, int64_t max_iter, uint64_t seed) {
              if (W.ndim() != 2 || W.shape(0) != W.shape(1)) throw py::value_error("W: expected (N, N)");
              const int64_t n = W.shape(0);
              need<double>(state, "state", {n}, true);
              if (mode != 0 && mode != 1) throw py::value_error("mode: expected 0 (async) or 1 (sync)");
              if (max_iter < 1) throw py::value_error("max_iter: expected >= 1");
              bool conv = false;
              int64_t it;
              const double* w = W.data();
              double* s = state.mutable_data();
              {
                  py::gil_scoped_release rel;
                  it = hopfield_recall(n, w, s, (HopfieldMode)mode, max_iter, seed, &conv);
              }
              return py::make_tuple(it, conv);
          },
          py::arg("W").noconvert(), py::arg("state").noconvert(), py::arg("mode"), py::arg("max_iter"),
          py::arg("seed"));
    m.def("hopfield_energy",
          [](CArr<double> W, CArr<double> state) {
              if (W.ndim() != 2 || W.shape(0) != W.shape(1)) throw py::value_error("W: expected (N, N)");
              need<double>(state, "state", {W.shape(0)});
              return hopfield_energy(W.shape(0), W.data(), state.data());
          },
          py::arg("W").noconvert(), py::arg("state").noconvert());

    py::class_<SOCache, std::shared_ptr<SOCache>>(m, "SecondOrderCache");
    m.def("second_order_forward",
          [](int64_t I, int64_t H, int64_t r, const py::list& params, const py::array& x,
             const py::object& h0, const py::object& lengths, bool keep) {
              if (x.dtype().equal(py::dtype::of<double>()))
                  return so_forward<double>(I, H, r, params, x, h0, lengths, keep);
              return so_forward<float>(I, H, r, params, x, h0, lengths, keep);
          },
          py::arg("input_size"), py::arg("hidden_size"), py::arg("rank"), py::arg("params"), py::arg("x"),
          py::arg("h0"), py::arg("lengths"), py::arg("keep"));
    m.def("second_order_backward",
          [](int64_t I, int64_t H, int64_t r, const py::list& params, const SOCache& c,
             const py::object& dy, const py::object& dhn, const py::list& grads, bool input_grad) {
              if (c.dbl) return so_backward<double>(I, H, r, params, c, dy, dhn, grads, input_grad);
              return so_backward<float>(I, H, r, params, c, dy, dhn, grads, input_grad);
          },
          py::arg("input_size"), py::arg("hidden_size"), py::arg("rank"), py::arg("params"), py::arg("cache"),
          py::arg("dy"), py::arg("dh_n"), py::arg("grads"), py::arg("input_grad") = true,
          "BPTT of a second-order layer: (dx or None where input_grad is false, dh0).");

    m.def("rtrl_sizes", [](const LayerSpec& s) { return py::make_tuple(rtrl_state_size(s), rtrl_param_count(s)); });
    m.def("rtrl_step",
          [](const LayerSpec& s, const py::list& params, const py::array& x, const py::array& h,
             const py::object& c, const py::array& P) {
              if (P.dtype().equal(py::dtype::of<double>())) rtrl_t<double>(s, params, x, h, c, P);
              else rtrl_t<float>(s, params, x, h, c, P);
          },
          py::arg("spec"), py::arg("params"), py::arg("x"), py::arg("h"), py::arg("c"), py::arg("P"),
          "One RTRL step: updates h, c and the sensitivities P in place.");
}
