"""A small, obviously-correct NumPy reference of every layer variant (one loop per step),
for the variants PyTorch lacks: peephole and coupled-gate LSTM, Cho et al.'s GRU."""
import numpy as np


def sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def ref_forward(layer, x, state=None, lengths=None):
    """x: (T, B, I) time-major; returns y (T, B, D*P), h_n, c_n (or None)."""
    import rnncore
    p = {k: v.astype(np.float64) for k, v in layer.params.items()}
    T, B, _ = x.shape
    H, P = layer.hidden_size, layer.proj_size or layer.hidden_size
    D, L = layer.num_directions, layer.num_layers
    lstm = isinstance(layer, rnncore.LSTM)
    gru = isinstance(layer, rnncore.GRU)
    lens = np.full(B, T) if lengths is None else np.asarray(lengths)
    h0 = c0 = None
    if state is not None:
        h0, c0 = state if lstm else (state, None)
    hn = np.zeros((L * D, B, P))
    cn = np.zeros((L * D, B, H))
    inp = x.astype(np.float64)
    for l in range(L):
        out = np.zeros((T, B, D * P))
        for d in range(D):
            sfx = f"_l{l}" + ("_reverse" if d else "")
            Wi, Wh = p["weight_ih" + sfx], p["weight_hh" + sfx]
            bi = p.get("bias_ih" + sfx, np.zeros(Wi.shape[0]))
            bh = p.get("bias_hh" + sfx, np.zeros(Wi.shape[0]))
            Wr = p.get("weight_hr" + sfx)
            pe = p.get("weight_peep" + sfx)
            idx = l * D + d
            h = np.zeros((B, P)) if h0 is None else h0[idx].astype(np.float64).copy()
            c = np.zeros((B, H)) if c0 is None else c0[idx].astype(np.float64).copy()
            order = range(T - 1, -1, -1) if d else range(T)
            for t in order:
                act = (t < lens)[:, None]
                xt = inp[t]
                if lstm:
                    a = xt @ Wi.T + bi + h @ Wh.T + bh
                    ai, af, ag, ao = np.split(a, 4, axis=1)
                    if pe is not None:
                        ai = ai + pe[0] * c
                        af = af + pe[1] * c
                    f = sig(af)
                    i = 1 - f if layer.coupled_gates else sig(ai)
                    cnew = f * c + i * np.tanh(ag)
                    if pe is not None:
                        ao = ao + pe[2] * cnew
                    m = sig(ao) * np.tanh(cnew)
                    hnew = m @ Wr.T if Wr is not None else m
                    c = np.where(act, cnew, c)
                elif gru:
                    ax = xt @ Wi.T + bi
                    xr, xz, xn = np.split(ax, 3, axis=1)
                    Whr, Whz, Whn = np.split(Wh, 3, axis=0)
                    bhr, bhz, bhn = np.split(bh, 3)
                    r = sig(xr + h @ Whr.T + bhr)
                    z = sig(xz + h @ Whz.T + bhz)
                    if layer.linear_before_reset:
                        n = np.tanh(xn + r * (h @ Whn.T + bhn))
                    else:
                        n = np.tanh(xn + (r * h) @ Whn.T + bhn)
                    hnew = (1 - z) * n + z * h
                else:
                    a = xt @ Wi.T + bi + h @ Wh.T + bh
                    hnew = np.tanh(a) if layer.nonlinearity == "tanh" else np.maximum(a, 0)
                h = np.where(act, hnew, h)
                out[t, :, d * P:(d + 1) * P] = np.where(act, hnew, 0)
            hn[idx] = h
            cn[idx] = c
        inp = out
    return inp, hn, (cn if lstm else None)


def round_bf16(a):
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32: what the
    kernels' bfloat16 recurrent weights hold. NaN stays NaN."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    out = r.view(np.float32).copy()
    out[np.isnan(a)] = np.nan
    return out


def bf16_params(params):
    """The layer's parameters with the recurrent weights (W_hh, W_hr) rounded to bfloat16."""
    return {k: (round_bf16(v) if k.startswith(("weight_hh", "weight_hr")) else v)
            for k, v in params.items()}
