"""NaN/Inf gradients and AMP's grad_scale / found_inf behave as in torch's fused AdamW."""
import copy

import pytest
import torch

import memkernels as mk
from _training import X, Y, mlp


def _grads(model, scale=1.0, poison=None):
    model.zero_grad()
    (scale * torch.nn.functional.cross_entropy(model(X[:64]), Y[:64])).backward()
    if poison is not None:
        next(model.parameters()).grad.view(-1)[3] = poison


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradients_propagate_like_torch(poison):
    a, b = mlp(), mlp()
    mine, theirs = mk.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True)
    for step in range(5):
        for model, opt in ((a, mine), (b, theirs)):
            _grads(model, poison=poison if step == 2 else None)
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.isnan(), q.isnan())
        torch.testing.assert_close(p, q, equal_nan=True, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("capturable", [False, True], ids=["host", "device"])
@pytest.mark.parametrize("cls, kw", [(mk.AdamW, {}), (mk.AdamW, {"memory_correction": -1.0}),
                                     (mk.Lion, {}), (mk.SGD, {"momentum": 0.9})])
def test_grad_scale_and_found_inf(cls, kw, capturable):
    """capturable=True never reads found_inf on the host: the kernels skip, and the step count is restored."""
    kw = {**kw, "capturable": capturable}
    a, b = mlp(), mlp()
    scaled, plain = cls(a.parameters(), lr=1e-2, **kw), cls(b.parameters(), lr=1e-2, **kw)
    for step in range(4):
        _grads(a, scale=1024.0)
        _grads(b)
        scaled.grad_scale, scaled.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        scaled.step()
        plain.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    _grads(a, scale=1024.0, poison=float("inf"))
    before = _snapshot(a, scaled)
    scaled.found_inf = torch.tensor(1.0)
    scaled.step()
    after = _snapshot(a, scaled)
    assert all(torch.equal(x, y) for x, y in zip(before[0], after[0]))
    assert str(before[1]) == str(after[1])


@pytest.mark.parametrize("capturable", [False, True], ids=["host", "device"])
def test_grad_scaler_drives_like_torch_fused(capturable):
    """torch.amp.GradScaler steps mk.AdamW exactly as it steps torch.optim.AdamW(fused=True), skips included."""
    a, b = mlp(), mlp()
    mine = mk.AdamW(a.parameters(), lr=1e-2, capturable=capturable)
    theirs = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True)
    sa, sb = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(6):
        for model, opt, scaler in ((a, mine, sa), (b, theirs, sb)):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.cross_entropy(model(X[:64]), Y[:64])).backward()
            if step == 3:
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
    assert sa.get_scale() == sb.get_scale() < 2.0 ** 10
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert mine.state[p]["step"].item() == theirs.state[q]["step"].item() == 5  # the skipped step not counted

