"""Checkpoints move between torch.optim.AdamW and mk.AdamW both ways, and training continues identically."""
import copy

import pytest
import torch

import memkernels as mk
from _training import batches, flat, max_rel, mlp, train


def _continue(model, opt_cls, state, steps=100, **kw):
    opt = opt_cls(model.parameters(), lr=1e-2, **kw)
    opt.load_state_dict(state)
    train(model, opt, batches(steps, seed=7))
    return flat(model)


@pytest.mark.parametrize("source, target", [(torch.optim.AdamW, mk.AdamW), (mk.AdamW, torch.optim.AdamW)])
def test_adamw_state_dict_round_trip(source, target):
    model = mlp()
    opt = source(model.parameters(), lr=1e-2)
    train(model, opt, batches(100))
    state = copy.deepcopy(opt.state_dict())
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    twin = copy.deepcopy(model)
    moved = _continue(model, target, copy.deepcopy(state))
    stayed = _continue(twin, source, copy.deepcopy(state))
    assert max_rel(moved, stayed) < 1e-6


def test_fused_torch_state_loads():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    train(model, opt, batches(50))
    twin = copy.deepcopy(model)
    moved = _continue(model, mk.AdamW, copy.deepcopy(opt.state_dict()))
    stayed = _continue(twin, torch.optim.AdamW, copy.deepcopy(opt.state_dict()), fused=True)
    assert max_rel(moved, stayed) < 1e-6


@pytest.mark.parametrize("hvp", ["trajectory"])
def test_corrected_optimizer_resumes_exactly(hvp):
    """The previous gradient, step count and previous lr travel in the checkpoint."""
    def make(params):
        return mk.AdamW(params, lr=1e-2, memory_correction=-1.0, hvp=hvp)

    model = mlp()
    opt = make(model.parameters())
    train(model, opt, batches(60))
    assert all(opt.state[p]["prev_grad"] is p.grad for p in model.parameters())  # kept, not copied: it travels
    twin, state = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    train(model, opt, batches(40, seed=9))
    resumed = make(twin.parameters())
    resumed.load_state_dict(state)
    assert "prev_grad" in state["state"][0]
    train(twin, resumed, batches(40, seed=9))
    assert torch.equal(flat(model), flat(twin))
