"""PyTorch as the oracle: build the twin of an rnncore layer and compare everything."""
import numpy as np
import torch

import rnncore
from conftest import assert_close

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def torch_twin(layer):
    """A torch.nn module with the same configuration and the same weights."""
    kw = dict(num_layers=layer.num_layers, bias=layer.bias, batch_first=layer.batch_first,
              bidirectional=layer.bidirectional)
    if isinstance(layer, rnncore.LSTM):
        t = torch.nn.LSTM(layer.input_size, layer.hidden_size, proj_size=layer.proj_size, **kw)
    elif isinstance(layer, rnncore.GRU):
        t = torch.nn.GRU(layer.input_size, layer.hidden_size, **kw)
    else:
        t = torch.nn.RNN(layer.input_size, layer.hidden_size, nonlinearity=layer.nonlinearity, **kw)
    t = t.to(TORCH_DTYPE[layer.dtype.type])
    t.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in layer.state_dict().items()})
    return t


def compare_with_torch(layer, x, with_state=True, lengths=None, rng=None, check_grads=True,
                       between=None, input_grad=True):
    """Forward + backward (gradients on y and on the final state) in both; asserts that
    outputs, final states, dx, dstate0 and every weight gradient agree. `between` is called
    after rnncore's forward, before its backward. input_grad=False: x does not require grad
    in PyTorch, rnncore's backward is asked for no dx (and must return None)."""
    rng = rng or np.random.default_rng(0)
    dt = layer.dtype.type
    t = torch_twin(layer)
    P = layer.proj_size or layer.hidden_size
    LD = layer.num_layers * layer.num_directions
    unbatched = x.ndim == 2
    B = 1 if unbatched else (x.shape[0] if layer.batch_first else x.shape[1])
    sh = (LD,) if unbatched else (LD, B)
    lstm = isinstance(layer, rnncore.LSTM)
    h0 = rng.standard_normal(sh + (P,)).astype(dt) if with_state else None
    c0 = rng.standard_normal(sh + (layer.hidden_size,)).astype(dt) if (with_state and lstm) else None

    state = (h0, c0) if lstm else h0
    layer.zero_grad()
    y, st = layer.forward(x, state, lengths=lengths)
    if between:
        between()

    xt = torch.from_numpy(x.copy()).requires_grad_(input_grad)
    tstate = None
    if with_state:
        h0t = torch.from_numpy(h0.copy()).requires_grad_()
        if lstm:
            c0t = torch.from_numpy(c0.copy()).requires_grad_()
            tstate = (h0t, c0t)
        else:
            tstate = h0t
    if lengths is not None:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            xt, torch.as_tensor(lengths), batch_first=layer.batch_first, enforce_sorted=False)
        yp, tst = t(packed, tstate)
        T = x.shape[1] if layer.batch_first else x.shape[0]
        yt, _ = torch.nn.utils.rnn.pad_packed_sequence(yp, batch_first=layer.batch_first,
                                                       total_length=T)
    else:
        yt, tst = t(xt, tstate)

    assert_close(y, yt.detach().numpy(), dt, "y")
    if lstm:
        assert_close(st[0], tst[0].detach().numpy(), dt, "h_n")
        assert_close(st[1], tst[1].detach().numpy(), dt, "c_n")
    else:
        assert_close(st, tst.detach().numpy(), dt, "h_n")
    if not check_grads:
        return

    dy = rng.standard_normal(y.shape).astype(dt)
    if lstm:
        dh = rng.standard_normal(st[0].shape).astype(dt)
        dc = rng.standard_normal(st[1].shape).astype(dt)
        dx, dst0 = layer.backward(dy, (dh, dc), input_grad=input_grad)
        loss = (yt * torch.from_numpy(dy)).sum() + (tst[0] * torch.from_numpy(dh)).sum() \
            + (tst[1] * torch.from_numpy(dc)).sum()
    else:
        dh = rng.standard_normal(st.shape).astype(dt)
        dx, dst0 = layer.backward(dy, dh, input_grad=input_grad)
        loss = (yt * torch.from_numpy(dy)).sum() + (tst * torch.from_numpy(dh)).sum()
    loss.backward()
    if input_grad:
        assert_close(dx, xt.grad.numpy(), dt, "dx")
    else:
        assert dx is None and xt.grad is None
    if with_state:
        if lstm:
            assert_close(dst0[0], tstate[0].grad.numpy(), dt, "dh0")
            assert_close(dst0[1], tstate[1].grad.numpy(), dt, "dc0")
        else:
            assert_close(dst0, tstate.grad.numpy(), dt, "dh0")
    named = dict(t.named_parameters())
    assert set(named) == set(layer.grads)
    for k, p in named.items():
        assert_close(layer.grads[k], p.grad.numpy(), dt, f"grad {k}")
