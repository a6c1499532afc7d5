"""With memory_correction=0 the optimizers are torch.optim / lion-pytorch over 300 real minibatches."""
import pytest
import torch
from lion_pytorch import Lion as LionPytorch
from pytorch_optimizer import AdEMAMix

import memkernels as mk
from _training import batches, flat, max_rel, mlp, run

TOL = 1e-6


@pytest.mark.parametrize("impl", [{"fused": True}, {"foreach": True}, {"foreach": False}])
@pytest.mark.parametrize("hp", [dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
                                dict(lr=1e-3, maximize=True, weight_decay=0.0)])
def test_adamw_equals_torch(impl, hp):
    assert max_rel(run(lambda p: mk.AdamW(p, **hp)), run(lambda p: torch.optim.AdamW(p, **hp, **impl))) < TOL


def test_adam_with_l2_equals_torch_adam():
    hp = dict(lr=1e-2, weight_decay=1e-2)
    mine = run(lambda p: mk.AdamW(p, decoupled_weight_decay=False, **hp))
    assert max_rel(mine, run(lambda p: torch.optim.Adam(p, **hp))) < TOL


@pytest.mark.parametrize("hp", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
                                dict(momentum=0.5, weight_decay=1e-2, maximize=False), dict(momentum=0.0)])
@pytest.mark.parametrize("impl", [{"fused": True}, {"foreach": True}])
def test_sgd_equals_torch(hp, impl):
    mine = run(lambda p: mk.SGD(p, lr=0.05, **hp))
    assert max_rel(mine, run(lambda p: torch.optim.SGD(p, lr=0.05, **hp, **impl))) < TOL


@pytest.mark.parametrize("hp", [dict(lr=1e-3), dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.1)])
def test_lion_equals_lion_pytorch(hp):
    assert max_rel(run(lambda p: mk.Lion(p, **hp)), run(lambda p: LionPytorch(p, **hp))) < TOL


def test_correction_zero_with_tracking_is_unchanged():
    """Measuring M (track_memory=True) must not change the step."""
    plain = run(lambda p: mk.AdamW(p, lr=1e-2))
    tracked = run(lambda p: mk.AdamW(p, lr=1e-2, track_memory=True))
    assert torch.equal(plain, tracked)


def test_param_groups_and_scheduler_match_torch():
    """Groups with their own hyperparameters, lr changed between steps by a torch scheduler."""
    def trained(cls, **kw):
        model = mlp()
        ps = list(model.parameters())
        opt = cls([{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}], **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
        for x, y in batches(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        return flat(model)

    assert max_rel(trained(mk.AdamW), trained(torch.optim.AdamW, fused=True)) < TOL


@pytest.mark.parametrize("hp,theirs", [
    (dict(lr=1e-3), {}),
    (dict(lr=2e-3, betas=(0.8, 0.99, 0.999), alpha=8.0, eps=1e-6, weight_decay=0.1),
     dict(weight_decouple=True)),
    (dict(lr=1e-3, alpha_warmup=120, beta3_warmup=120), dict(t_alpha_beta3=120)),
])
def test_ademamix_equals_pytorch_optimizer(hp, theirs):
    """pytorch-optimizer's AdEMAMix (decoupled decay: weight_decouple=True; one warm-up length for both)."""
    mine = run(lambda p: mk.AdEMAMix(p, **hp))
    other = {k: v for k, v in hp.items() if k not in ("alpha_warmup", "beta3_warmup")}
    assert max_rel(mine, run(lambda p: AdEMAMix(p, **other, **theirs))) < TOL
