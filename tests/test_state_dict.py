"""Checkpoints move between torch.optim.AdamW and mk.AdamW both ways, and training continues identically."""
import copy
import warnings

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


@pytest.mark.parametrize("step", [5, 5.0, torch.tensor(5), torch.tensor(5.0, dtype=torch.float64)],
                         ids=["int", "float", "int64 tensor", "float64 tensor"])
def test_step_counts_of_older_checkpoints_load(step):
    """Python numbers and integer tensors (older torch checkpoints) step like torch.optim.AdamW, which converts them."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, batches(5))
    state = copy.deepcopy(opt.state_dict())
    for st in state["state"].values():
        st["step"] = copy.deepcopy(step)
    twin = copy.deepcopy(model)
    moved = _continue(model, mk.AdamW, copy.deepcopy(state), steps=20)
    stayed = _continue(twin, torch.optim.AdamW, copy.deepcopy(state), steps=20)
    assert max_rel(moved, stayed) < 1e-6


@pytest.mark.parametrize("step", [float("nan"), float("inf"), -1, torch.tensor(-3.0), torch.tensor([1.0, 2.0]), "7"],
                         ids=["nan", "inf", "negative", "negative tensor", "two elements", "str"])
def test_a_bad_step_count_is_refused_at_load_and_changes_nothing(step):
    model = mlp()
    opt = mk.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, batches(3))
    before = copy.deepcopy(opt.state_dict())
    state = copy.deepcopy(before)
    state["state"][1]["step"] = step
    with pytest.raises(ValueError, match="state 1: 'step' must be"):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, st in before["state"].items():
        assert all(torch.equal(st[k], after["state"][i][k]) for k in st)


def test_a_lagging_parameter_costs_no_replay(monkeypatch):
    """A parameter one step behind its group (no gradient on the first step) reuses the kept coefficients."""
    from memkernels.coefficients import EMAAge
    advance = EMAAge.advance
    calls = []
    monkeypatch.setattr(EMAAge, "advance", lambda self: calls.append(1) or advance(self))
    lead, lag = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = mk.AdamW([lead, lag], lr=1e-2)
    steps = 200
    for n in range(steps):
        lead.grad = torch.randn(3)
        lag.grad = torch.randn(3) if n else None
        opt.step()
    assert int(opt.state[lead]["step"]) == steps and int(opt.state[lag]["step"]) == steps - 1
    assert len(calls) <= 2 * 2 * steps  # two EMAs, at most two counts a step: no replay from step 0


def _trained(opt_cls, **kw):
    model = mlp()
    opt = opt_cls(model.parameters(), **kw)
    train(model, opt, batches(2))
    return model, copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("source, target, match", [
    ((torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (mk.AdamW, {}), r"holds \['momentum_buffer'\], which "
     r"memkernels.AdamW does not keep"),
    ((torch.optim.AdamW, {}), (mk.Lion, {}), r"holds \['exp_avg_sq'\], which memkernels.Lion does not keep"),
    ((torch.optim.AdamW, dict(amsgrad=True)), (mk.AdamW, {}), r"holds \['max_exp_avg_sq'\]"),
    ((mk.Lion, {}), (mk.AdamW, {}), "lacks 'exp_avg_sq', a tensor memkernels.AdamW needs"),
], ids=["sgd into adamw", "adamw into lion", "amsgrad into adamw", "lion into adamw"])
def test_a_state_of_another_optimizer_is_refused_naming_the_key(source, target, match):
    model, state = _trained(source[0], **source[1])
    opt = target[0](model.parameters(), lr=1e-2, **target[1])
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    assert not opt.state


@pytest.mark.parametrize("key, value, match", [("exp_avg", None, "lacks 'exp_avg'"),
                                               ("exp_avg_sq", 3.0, "'exp_avg_sq' must be a tensor, got float")])
def test_a_state_with_a_missing_or_malformed_tensor_is_refused(key, value, match):
    model, state = _trained(torch.optim.AdamW, lr=1e-2)
    state["state"][0][key] = value
    opt = mk.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    assert not opt.state


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_torch_sgd_states_load_with_and_without_a_buffer(momentum):
    model, state = _trained(torch.optim.SGD, lr=0.1, momentum=momentum)
    twin = copy.deepcopy(model)
    moved = _continue(model, mk.SGD, copy.deepcopy(state), steps=10, momentum=momentum)
    stayed = _continue(twin, torch.optim.SGD, copy.deepcopy(state), steps=10, momentum=momentum)
    assert max_rel(moved, stayed) < 1e-6


def test_a_contiguous_checkpoint_resumes_into_a_channels_last_model():
    """States are brought to the param's element order at load, and training goes on as torch.optim's."""
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-2)
    conv(x).square().sum().backward()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    mine = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    theirs = copy.deepcopy(mine)
    x = x.to(memory_format=torch.channels_last)
    for model, cls in ((mine, mk.AdamW), (theirs, torch.optim.AdamW)):
        o = cls(model.parameters(), lr=1e-2)
        o.load_state_dict(copy.deepcopy(state))
        for _ in range(5):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
    assert mine.weight.is_contiguous(memory_format=torch.channels_last)
    assert max_rel(flat(mine), flat(theirs)) < 1e-6


@pytest.mark.parametrize("grad_of", ["contiguous", "expanded"])
def test_a_gradient_in_another_layout_is_copied_into_the_params_and_warned_once(grad_of):
    """A channels_last param with a contiguous (or an expanded, non-dense) grad: the step copies the grad into
    the param's order, says so once, and equals torch.optim.AdamW."""
    torch.manual_seed(0)
    mine = torch.nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))
    twin = torch.nn.Parameter(mine.detach().clone())
    opt, ref = mk.AdamW([mine], lr=1e-2), torch.optim.AdamW([twin], lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            g = torch.randn(2, 3, 4, 5) if grad_of == "contiguous" else torch.randn(1, 3, 1, 5).expand(2, 3, 4, 5)
            mine.grad, twin.grad = g, g.clone()
            opt.step()
            ref.step()
    assert sum("copied into the parameter's layout" in str(w.message) for w in caught) == 1
    assert mine.is_contiguous(memory_format=torch.channels_last)
    assert max_rel(mine.detach().flatten(), twin.detach().flatten()) < 1e-6


@pytest.mark.parametrize("cls", [mk.AdamW, mk.Lion, mk.SGD])
def test_a_column_param_steps_on_a_transposed_gradient(cls):
    """A (D, 1) param whose gradient comes through .t() (strides (1, D) against (1, 1)): one element order."""
    torch.manual_seed(0)
    mine = torch.nn.Parameter(torch.randn(8, 1))
    twin = torch.nn.Parameter(mine.detach().clone())
    reference, kw = {mk.AdamW: (torch.optim.AdamW, {}), mk.SGD: (torch.optim.SGD, dict(momentum=0.9)),
                     mk.Lion: (None, {})}[cls]
    opts = [cls([mine], lr=1e-2, **kw)]
    if reference is not None:
        opts.append(reference([twin], lr=1e-2, **kw))
    for _ in range(3):
        g = torch.randn(1, 8).t()
        assert g.stride() == (1, 8)
        for p, o in zip((mine, twin), opts):
            p.grad = g.clone().t().contiguous().t()  # keeps the (1, 8) strides
            o.step()
    assert torch.isfinite(mine).all()
    if reference is not None:
        assert max_rel(mine.detach().flatten(), twin.detach().flatten()) < 1e-6
