"""Export to ONNX with the standard RNN, LSTM and GRU operators.

    rnncore.export_onnx(layer_or_model, "model.onnx", opset=17)

A recurrent layer becomes a graph with input "x" ((T, B, I), or (B, T, I) with
batch_first) and an optional "lengths" input ((B,) int64, exported as the operator's
sequence_lens), and outputs "y", "h_n" (and "c_n" for LSTM), zero initial state. A
Sequential becomes a graph from "x" (token ids (B, T) int64 or features (B, T, F) float)
and optional "lengths" to "y": Embedding is a Gather, OneHot a Gather from the identity,
Dense a MatMul and Add (and its activation), LastStep a GatherND at each sequence's last
valid step, Dropout the identity. Gate orders are converted (PyTorch LSTM i,f,g,o -> ONNX
i,o,f,c; GRU r,z,n -> z,r,h; peepholes i,f,o -> i,o,f); GRU's linear_before_reset maps to
the operator's attribute; the LSTM's coupled gates (i = 1 - f) are exported exactly as an input gate with the forget
gate's weights negated (sigmoid(-a) = 1 - sigmoid(a)), since runtimes read the operator's
input_forget attribute as f = 1 - i. LSTM projections and
second-order RNNs have no ONNX operator and are refused with a ValueError.
"""
from __future__ import annotations

import numpy as np

from .blocks import Dense, Dropout, Embedding, LastStep, OneHot
from .layers import GRU, LSTM, RNN, _Recurrent

_LSTM_ORDER = [0, 3, 1, 2]      # i f g o -> i o f c
_GRU_ORDER = [1, 0, 2]          # r z n -> z r h


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("export_onnx needs the 'onnx' package: pip install onnx") from e
    return onnx, TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self):
        self.onnx, self.TP, self.helper, self.nh = _onnx()
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, arr, base="c"):
        name = self.name(base)
        self.inits.append(self.nh.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type, inputs, n_out=1, base=None, **attrs):
        outs = [self.name(base or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, **attrs))
        return outs if n_out > 1 else outs[0]


def _reorder(w, order, H, coupled=False):
    if coupled:          # CIFG: i = 1 - f = sigmoid(-a_f): the input-gate rows become -f's
        w = np.concatenate([-w[H:2 * H], w[H:]], axis=0)
    return np.concatenate([w[i * H:(i + 1) * H] for i in order], axis=0)


def _recurrent(b: _Builder, layer, x_tm, seq_lens):
    """x_tm: time-major (T, B, F) tensor name. Returns (y (T, B, D*H), h_n, c_n)."""
    if layer.proj_size:
        raise ValueError("export_onnx: LSTM projections (proj_size) have no ONNX operator")
    H, D = layer.hidden_size, layer.num_directions
    kind = "LSTM" if isinstance(layer, LSTM) else "GRU" if isinstance(layer, GRU) else "RNN"
    order = _LSTM_ORDER if kind == "LSTM" else _GRU_ORDER if kind == "GRU" else [0]
    hs, cs = [], []
    inp = x_tm
    p = layer.params
    for l in range(layer.num_layers):
        Ws, Rs, Bs, Ps = [], [], [], []
        cp = kind == "LSTM" and layer.coupled_gates
        for d in range(D):
            sfx = f"_l{l}" + ("_reverse" if d else "")
            Ws.append(_reorder(p["weight_ih" + sfx], order, H, cp))
            Rs.append(_reorder(p["weight_hh" + sfx], order, H, cp))
            if layer.bias:
                Bs.append(np.concatenate([_reorder(p["bias_ih" + sfx], order, H, cp),
                                          _reorder(p["bias_hh" + sfx], order, H, cp)]))
            if kind == "LSTM" and layer.peephole:
                pe = p["weight_peep" + sfx]
                Ps.append(np.concatenate([-pe[1] if cp else pe[0], pe[2], pe[1]]))
        ins = [inp, b.const(np.stack(Ws), "W"), b.const(np.stack(Rs), "R"),
               b.const(np.stack(Bs), "B") if Bs else "", seq_lens or ""]
        attrs = {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"}
        n_out = 2
        if kind == "LSTM":
            ins += ["", ""] + ([b.const(np.stack(Ps), "P")] if Ps else [])
            n_out = 3
        elif kind == "GRU":
            attrs["linear_before_reset"] = int(layer.linear_before_reset)
        else:
            attrs["activations"] = ["Tanh" if layer.nonlinearity == "tanh" else "Relu"] * D
        while ins and ins[-1] == "":
            ins.pop()
        outs = b.op(kind, ins, n_out=n_out, base=kind.lower(), **attrs)
        y4 = outs[0]                                        # (T, D, B, H)
        yt = b.op("Transpose", [y4], perm=[0, 2, 1, 3])      # (T, B, D, H)
        inp = b.op("Reshape", [yt, b.const(np.array([0, 0, D * H], np.int64), "shape")])
        hs.append(outs[1])
        if kind == "LSTM":
            cs.append(outs[2])
    h_n = hs[0] if len(hs) == 1 else b.op("Concat", hs, axis=0)
    c_n = None
    if cs:
        c_n = cs[0] if len(cs) == 1 else b.op("Concat", cs, axis=0)
    return inp, h_n, c_n


def export_onnx(obj, path, opset=17, with_lengths=None):
    """Writes `obj` (an RNN/LSTM/GRU layer or a Sequential) as an ONNX model to `path`.
    with_lengths: add the "lengths" input (default: True for recurrent layers and for
    models with a recurrent layer or LastStep)."""
    from .models import Sequential
    b = _Builder()
    TP, helper = b.TP, b.helper
    float_t = TP.DOUBLE if getattr(obj, "dtype", np.dtype("float32")) == np.float64 else TP.FLOAT
    inputs, outputs = [], []
    if isinstance(obj, _Recurrent):
        if with_lengths is None:
            with_lengths = True
        shape = ["B", "T", obj.input_size] if obj.batch_first else ["T", "B", obj.input_size]
        inputs.append(helper.make_tensor_value_info("x", float_t, shape))
        seq = None
        if with_lengths:
            inputs.append(helper.make_tensor_value_info("lengths", TP.INT64, ["B"]))
            seq = b.op("Cast", ["lengths"], to=TP.INT32)
        x = b.op("Transpose", ["x"], perm=[1, 0, 2]) if obj.batch_first else "x"
        y, h, c = _recurrent(b, obj, x, seq)
        if obj.batch_first:
            y = b.op("Transpose", [y], perm=[1, 0, 2])
        b.nodes.append(helper.make_node("Identity", [y], ["y"]))
        b.nodes.append(helper.make_node("Identity", [h], ["h_n"]))
        LD = obj.num_layers * obj.num_directions
        yshape = ["B", "T", obj.output_size] if obj.batch_first else ["T", "B", obj.output_size]
        outputs += [helper.make_tensor_value_info("y", float_t, yshape),
                    helper.make_tensor_value_info("h_n", float_t, [LD, "B", obj.hidden_size])]
        if c is not None:
            b.nodes.append(helper.make_node("Identity", [c], ["c_n"]))
            outputs.append(helper.make_tensor_value_info("c_n", float_t, [LD, "B", obj.hidden_size]))
    elif isinstance(obj, Sequential):
        first = obj.blocks[0]
        tokens = isinstance(first, (Embedding, OneHot))
        dt = next((blk.dtype for blk in obj.blocks if hasattr(blk, "dtype")), np.dtype("float32"))
        float_t = TP.DOUBLE if dt == np.float64 else TP.FLOAT
        if tokens:
            inputs.append(helper.make_tensor_value_info("x", TP.INT64, ["B", "T"]))
        else:
            feat = first.input_size if hasattr(first, "input_size") else first.in_features
            inputs.append(helper.make_tensor_value_info("x", float_t, ["B", "T", feat]))
        needs_len = any(isinstance(blk, (_Recurrent, LastStep)) for blk in obj.blocks)
        if with_lengths is None:
            with_lengths = needs_len
        seq = None
        if with_lengths:
            inputs.append(helper.make_tensor_value_info("lengths", TP.INT64, ["B"]))
            seq = b.op("Cast", ["lengths"], to=TP.INT32)
        cur = "x"
        rank, width = 3, None
        for blk in obj.blocks:
            if isinstance(blk, Embedding):
                cur = b.op("Gather", [b.const(blk.params["weight"], "emb"), cur], axis=0)
                width = blk.embedding_dim
            elif isinstance(blk, OneHot):
                cur = b.op("Gather", [b.const(np.eye(blk.num_classes, dtype=blk.dtype), "eye"), cur], axis=0)
                width = blk.num_classes
            elif isinstance(blk, _Recurrent):
                tm = b.op("Transpose", [cur], perm=[1, 0, 2])
                y, _, _ = _recurrent(b, blk, tm, seq)
                cur = b.op("Transpose", [y], perm=[1, 0, 2])
                width = blk.output_size
            elif isinstance(blk, Dense):
                cur = b.op("MatMul", [cur, b.const(np.ascontiguousarray(blk.params["weight"].T), "wT")])
                if blk.bias:
                    cur = b.op("Add", [cur, b.const(blk.params["bias"], "bias")])
                width = blk.out_features
                act = {"tanh": "Tanh", "relu": "Relu", "sigmoid": "Sigmoid"}.get(blk.activation)
                if act:
                    cur = b.op(act, [cur])
            elif isinstance(blk, Dropout):
                continue
            elif isinstance(blk, LastStep):
                rank = 2
                if with_lengths:
                    idx = b.op("Sub", ["lengths", b.const(np.array(1, np.int64), "one")])
                    idx = b.op("Unsqueeze", [idx, b.const(np.array([1], np.int64), "ax")])
                    cur = b.op("GatherND", [cur, idx], batch_dims=1)
                else:
                    cur = b.op("Gather", [cur, b.const(np.array(-1, np.int64), "last")], axis=1)
            else:
                raise ValueError(f"export_onnx: no ONNX form for block {type(blk).__name__}")
        b.nodes.append(helper.make_node("Identity", [cur], ["y"]))
        outputs.append(helper.make_tensor_value_info("y", float_t, ["B", "T", width][:1] + (["T"] if rank == 3 else []) + [width]))
    else:
        raise TypeError(f"export_onnx: expected an RNN/LSTM/GRU layer or a Sequential, got {type(obj).__name__}")
    graph = helper.make_graph(b.nodes, "rnncore", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset))],
                              producer_name="rnncore")
    model.ir_version = min(model.ir_version, 8)
    b.onnx.checker.check_model(model)
    b.onnx.save(model, str(path))
    return model
