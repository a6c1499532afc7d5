"""The trajectory HVP keeps the previous gradient tensor where it can (optim/_prev_grads.py), and steps exactly
as with a copy: a loop that makes new gradient tensors against a twin that rewrites one tensor in place."""
import warnings

import pytest
import torch

import memkernels as mk
from memkernels import backends

SHAPES = [(7, 5), (33,), (1,), (0,)]
BACKENDS = [b for b in ("reference", "numba", "triton") if backends.load(b).startswith("available")]
OPTIMIZERS = {
    "adamw": lambda ps, **kw: mk.AdamW(ps, lr=1e-2, weight_decay=0.1, memory_correction=-1.0, **kw),
    "lion": lambda ps, **kw: mk.Lion(ps, lr=1e-3, weight_decay=0.1, smoothing=1e-3, memory_correction=-1.0, **kw),
    "sgd": lambda ps, **kw: mk.SGD(ps, lr=1e-2, momentum=0.9, memory_correction=-1.0, **kw),
}


def _params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]


def _grads(steps, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(steps)]


def _feed(params, grads, new):
    """New gradient tensors, as after zero_grad(), or each param's one gradient tensor rewritten in place."""
    for p, g in zip(params, grads):
        if new or p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def _pair(name="adamw", dtype=torch.float32, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the trajectory note
        kept_ps, copied_ps = _params(dtype), _params(dtype)
        return (kept_ps, OPTIMIZERS[name](kept_ps, track_memory=True, **kw),
                copied_ps, OPTIMIZERS[name](copied_ps, track_memory=True, **kw))


def _assert_same(opt_a, params_a, opt_b, params_b):
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key
    assert repr(opt_a.memory_stats()) == repr(opt_b.memory_stats())  # repr: NaN equals NaN


def _step_alike(pair, grads=None):
    """Feed grads (new tensors to the first optimizer, in place to its twin) unless None, step both, compare."""
    kept_ps, kept, copied_ps, copied = pair
    if grads is not None:
        _feed(kept_ps, grads, new=True)
        _feed(copied_ps, grads, new=False)
    kept.step()
    copied.step()
    _assert_same(kept, kept_ps, copied, copied_ps)


def _kept(opt, params):
    return [opt.state[p]["prev_grad"] is p.grad for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_kept_and_copied_previous_gradients_step_alike(name, backend):
    pair = kept_ps, kept, copied_ps, copied = _pair(name, backend=backend)
    for n, grads in enumerate(_grads(6)):
        _step_alike(pair, grads)
        assert _kept(kept, kept_ps) == [n >= 1] * len(SHAPES)  # the first step has no previous gradient
        assert not any(_kept(copied, copied_ps))


@pytest.mark.parametrize("why", ["maximize", "grad scale", "bfloat16", "view", "storage alias", "capturable"])
def test_gradients_that_are_not_kept(why):
    dtype = torch.bfloat16 if why == "bfloat16" else torch.float32
    kw = {"maximize": why == "maximize", "capturable": why == "capturable"}
    pair = kept_ps, kept, copied_ps, copied = _pair(dtype=dtype, backend="reference", **kw)
    aliases = []
    for grads in _grads(4, dtype):
        if why == "grad scale":  # as GradScaler hands them over: scaled gradients and the scale
            grads = [4.0 * g for g in grads]
            kept.grad_scale = copied.grad_scale = torch.tensor(4.0)
        _feed(copied_ps, grads, new=False)
        if why == "view":  # slices of one flat buffer, as flat-gradient frameworks hand them out
            flat = torch.cat([g.flatten() for g in grads])
            sizes = [g.numel() for g in grads]
            for p, part, g in zip(kept_ps, flat.split(sizes), grads):
                p.grad = part.view(g.shape)
        else:
            _feed(kept_ps, grads, new=True)
        if why == "storage alias":  # another tensor on the gradient's memory, which may write it
            aliases.append([p.grad.data for p in kept_ps])
        _step_alike(pair)
        assert not any(_kept(kept, kept_ps))


def test_kept_then_unkeepable_gradients_copy_the_kept_one():
    pair = kept_ps, kept, copied_ps, copied = _pair()
    for n, grads in enumerate(_grads(6)):
        _feed(copied_ps, grads, new=False)
        if n < 3:
            _feed(kept_ps, grads, new=True)
        else:  # views from now on: the kept gradient becomes a buffer again, with its values
            for p, g in zip(kept_ps, grads):
                p.grad = torch.stack([g, g])[0]
        _step_alike(pair)
        assert _kept(kept, kept_ps) == [1 <= n < 3] * len(SHAPES)


@pytest.mark.parametrize("how", ["accumulated into", "written after the step"])
def test_a_kept_gradient_written_in_place_costs_one_hvp_and_a_warning(how):
    pair = kept_ps, kept, copied_ps, copied = _pair()
    grads = _grads(8)
    for step in grads[:3]:
        _step_alike(pair, step)
    assert all(_kept(kept, kept_ps))
    for p, q, g in zip(kept_ps, copied_ps, grads[3]):
        if how == "accumulated into":  # the loop turns to accumulating into the tensor the optimizer kept
            p.grad.add_(g)
        else:  # someone scales the old gradient, while backward makes a new one
            p.grad.mul_(2.0)
            p.grad = g.clone()
        q.grad.copy_(p.grad)
        del copied.state[q]["prev_grad"]  # the twin: the same gradient and no previous one (no HVP this step)
    with pytest.warns(RuntimeWarning, match="written in place"):
        _step_alike(pair)
    for step in grads[4:]:  # new tensors again: the optimizer copies from now on
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "memkernels: a gradient kept", RuntimeWarning)
            _step_alike(pair, step)
        assert not any(_kept(kept, kept_ps))


def test_a_second_step_on_the_same_gradients_matches_the_copy():
    pair = kept_ps, kept, copied_ps, copied = _pair()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "memkernels: a gradient kept", RuntimeWarning)
        for n, step in enumerate(_grads(6)):
            _step_alike(pair, step)
            if n == 2:  # step 2 twice, on one gradient
                _step_alike(pair)
    assert all(_kept(kept, kept_ps))  # kept again after the repeat


def _shares_storage(t):
    """A copy of t that is no view but shares its storage with another live tensor (held by the function)."""
    storage = t.clone().untyped_storage()
    _shares_storage.twin = torch.empty(0).set_(storage, 0, t.shape)
    return torch.empty(0).set_(storage, 0, t.shape)


CHANGES = {  # what happens to one param's gradients between two steps that both keep
    "nothing": lambda refs, grads: None,
    "grad is a view": lambda refs, grads: grads.__setitem__(0, torch.randn(2, 7, 5)[0]),
    "grad shares a storage": lambda refs, grads: grads.__setitem__(0, _shares_storage(grads[0])),
    "kept gradient written": lambda refs, grads: refs[1].add_(1.0),
    "grad is the kept gradient": lambda refs, grads: grads.__setitem__(1, refs[1]),
    "grad in float64": lambda refs, grads: grads.__setitem__(2, grads[2].double()),
}


@pytest.mark.parametrize("change", CHANGES)
def test_all_kept_again_answers_as_plan_does(change):
    """The list-at-a-time check of a steady step says "keep" for all exactly where plan() says it for each."""
    from memkernels.optim._prev_grads import PrevGrads

    params = _params()[:3]
    refs = [torch.randn(p.shape) for p in params]
    prev = PrevGrads()
    states = [{} for _ in params]
    prev.record_kept(params, refs, states)
    grads = [torch.randn(p.shape) for p in params]
    CHANGES[change](refs, grads)
    each = [prev.plan(p, g, s["prev_grad"], True, torch.float32)[0] for p, g, s in zip(params, grads, states)]
    assert prev.all_kept_again(params, grads, refs, torch.float32) == (each == ["keep"] * 3), each
    assert (change == "nothing") == (each == ["keep"] * 3)
