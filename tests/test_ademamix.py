"""mk.AdEMAMix as an optimizer: a failed step changes nothing, device mode steps as host mode, checkpoints
resume exactly, and the memory correction runs in every H d mode (its math: tests/test_ademamix_math.py; the
kernels against the reference: tests/test_parity.py; against pytorch-optimizer: tests/test_optim_vs_torch.py)."""
import copy

import pytest
import torch

import memkernels as mk
from _training import batches, mlp


def _train(make, steps=40, closure=False, seed=0):
    torch.manual_seed(seed)
    model = mlp()
    opt = make(model.parameters())
    for x, y in batches(steps):
        def loss_fn():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()
    return model, opt


def test_a_failed_step_changes_nothing():
    model, opt = _train(lambda p: mk.AdEMAMix(p, lr=1e-2, memory_correction=-1.0, hvp="trajectory"), steps=3)
    opt.param_groups[0]["alpha"] = -1.0
    params, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="alpha"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert str(state) == str(opt.state_dict())


def test_device_mode_steps_as_host_mode():
    """capturable=True takes the coefficients' closed forms on a step-count tensor, host mode their recursions:
    the same steps to fp32 rounding, with the trajectory correction."""
    kw = dict(lr=1e-2, weight_decay=0.1, memory_correction=-1.0, hvp="trajectory")
    host, _ = _train(lambda p: mk.AdEMAMix(p, **kw))
    device, _ = _train(lambda p: mk.AdEMAMix(p, capturable=True, **kw))
    for a, b in zip(host.parameters(), device.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("warmup", [None, 25])
def test_a_checkpoint_resumes_exactly(warmup):
    make = lambda p: mk.AdEMAMix(p, lr=1e-2, alpha_warmup=warmup, beta3_warmup=warmup)  # noqa: E731
    straight, _ = _train(make, steps=40)
    torch.manual_seed(0)
    model = mlp()
    opt = make(model.parameters())
    data = list(batches(40))
    for i, (x, y) in enumerate(data):
        if i == 20:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
            model = mlp()
            model.load_state_dict(saved[0])
            opt = make(model.parameters())
            opt.load_state_dict(saved[1])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), model.parameters()))


@pytest.mark.parametrize("hvp", ["trajectory", "probe"])
def test_the_correction_runs_and_is_measured(hvp):
    """With memory_correction=-1 the loss falls, and memory_stats reports the correction it applied."""
    model, opt = _train(lambda p: mk.AdEMAMix(p, lr=3e-3, memory_correction=-1.0, hvp=hvp), steps=60,
                        closure=hvp == "probe")
    stats = opt.memory_stats()[0]
    assert stats["correction_norm"] > 0 and torch.isfinite(torch.tensor(list(stats.values()))).all()
    x, y = next(iter(batches(1)))
    loss = torch.nn.functional.cross_entropy
    assert loss(model(x), y) < loss(mlp()(x), y)
