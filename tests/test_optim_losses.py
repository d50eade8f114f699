"""Optimizers step by step against torch.optim on the same gradients; clipping and losses
against torch."""
import numpy as np
import pytest
import torch

import rnncore as rc

OPTS = [
    (rc.optim.SGD, torch.optim.SGD, dict(lr=0.1)),
    (rc.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (rc.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (rc.optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.5, dampening=0.3)),
    (rc.optim.Adam, torch.optim.Adam, dict(lr=0.01)),
    (rc.optim.Adam, torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (rc.optim.AdamW, torch.optim.AdamW, dict(lr=0.01)),
    (rc.optim.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.3)),
    (rc.optim.RMSprop, torch.optim.RMSprop, dict(lr=0.01)),
    (rc.optim.RMSprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1)),
    (rc.optim.Adagrad, torch.optim.Adagrad, dict(lr=0.1)),
    (rc.optim.Adagrad, torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.1,
                                                 initial_accumulator_value=0.5)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("i", range(len(OPTS)))
def test_optimizer_matches_torch(i, dtype):
    ours_cls, torch_cls, kw = OPTS[i]
    rng = np.random.default_rng(i)
    params = {"a": rng.standard_normal((4, 3)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    ours = ours_cls(**kw)
    theirs = torch_cls(list(tparams.values()), **kw)
    for step in range(25):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
        for k, p in tparams.items():
            p.grad = torch.from_numpy(grads[k].copy())
        theirs.step()
        ours.step(params, grads)
        for k in params:
            tol = 1e-12 if dtype == np.float64 else 2e-6
            np.testing.assert_allclose(params[k], tparams[k].detach().numpy(), rtol=tol, atol=tol,
                                       err_msg=f"{ours_cls.__name__} step {step} {k}")


def test_optimizer_updates_a_model_in_place():
    m = rc.Sequential(rc.GRU(2, 3, batch_first=True), rc.Dense(3, 1))
    before = {k: v.copy() for k, v in m.params.items()}
    arrays = {k: v for k, v in m.params.items()}
    for g in m.grads.values():
        g.fill(1.0)
    rc.optim.SGD(lr=0.5).step(m.params, m.grads)
    for k in before:
        assert m.params[k] is arrays[k]
        np.testing.assert_allclose(m.params[k], before[k] - 0.5)
    np.testing.assert_allclose(m.blocks[0].params["weight_hh_l0"], before["0.weight_hh_l0"] - 0.5)


def test_clip_grad_norm_and_value_match_torch():
    rng = np.random.default_rng(0)
    grads = {"a": rng.standard_normal((3, 4)) * 5, "b": rng.standard_normal(6) * 5}
    tp = [torch.nn.Parameter(torch.zeros(v.shape, dtype=torch.float64)) for v in grads.values()]
    for p, g in zip(tp, grads.values()):
        p.grad = torch.from_numpy(g.copy())
    tn = torch.nn.utils.clip_grad_norm_(tp, 2.0)
    n = rc.optim.clip_grad_norm(grads, 2.0)
    assert n == pytest.approx(float(tn))
    for p, g in zip(tp, grads.values()):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-6)
    rc.optim.clip_grad_value(grads, 0.1)
    torch.nn.utils.clip_grad_value_(tp, 0.1)
    for p, g in zip(tp, grads.values()):
        np.testing.assert_allclose(g, p.grad.numpy())


def test_cross_entropy_matches_torch_with_ignore_index_and_mask():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((4, 5, 7))
    t = rng.integers(0, 7, (4, 5))
    t[0, 1] = t[2, 3] = -100
    zt = torch.from_numpy(z).requires_grad_()
    ref = torch.nn.functional.cross_entropy(zt.reshape(-1, 7), torch.from_numpy(t).reshape(-1),
                                            ignore_index=-100)
    ref.backward()
    loss, g = rc.losses.cross_entropy(z, t, ignore_index=-100, return_grad=True)
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(g, zt.grad.numpy(), atol=1e-14)
    mask = (t != -100)
    t2 = np.where(mask, t, 0)
    assert rc.losses.cross_entropy(z, t2, mask=mask) == pytest.approx(ref.item(), rel=1e-12)
    assert rc.losses.cross_entropy(z, t2) != pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match="targets"):
        rc.losses.cross_entropy(z, t2[:, :3])


def test_mse_and_bce_match_torch():
    rng = np.random.default_rng(2)
    p = rng.standard_normal((3, 4))
    y = rng.standard_normal((3, 4))
    pt = torch.from_numpy(p).requires_grad_()
    ref = torch.nn.functional.mse_loss(pt, torch.from_numpy(y))
    ref.backward()
    loss, g = rc.losses.mse(p, y, return_grad=True)
    assert loss == pytest.approx(ref.item())
    np.testing.assert_allclose(g, pt.grad.numpy())
    yb = rng.random((3, 4))
    pt = torch.from_numpy(p).requires_grad_()
    ref = torch.nn.functional.binary_cross_entropy_with_logits(pt, torch.from_numpy(yb))
    ref.backward()
    loss, g = rc.losses.binary_cross_entropy(p, yb, return_grad=True)
    assert loss == pytest.approx(ref.item())
    np.testing.assert_allclose(g, pt.grad.numpy(), atol=1e-14)
    prob = 1 / (1 + np.exp(-p))
    pt = torch.from_numpy(prob).requires_grad_()
    ref = torch.nn.functional.binary_cross_entropy(pt, torch.from_numpy(yb))
    ref.backward()
    loss, g = rc.losses.binary_cross_entropy(prob, yb, from_logits=False, return_grad=True)
    assert loss == pytest.approx(ref.item())
    np.testing.assert_allclose(g, pt.grad.numpy(), rtol=1e-8)
