"""track_memory=k: one measured step in k gives the diagnostics an every-step optimizer gives at that step, moves
the parameters bit for bit as it does, and holds its last measured step's figures in between."""
from __future__ import annotations

import warnings

import pytest
import torch

import memkernels as mk

SHAPES = [(7, 5), (13,)]
EVERY = 3


def _run(track_memory, *, backend: str, op: str = "AdamW", inplace: bool = False, closure: bool = False,
         steps: int = 8, **kwargs) -> list[tuple[dict, list[torch.Tensor], mk.optim.AdamW]]:
    """memory_stats() and the params after each step, on one gradient sequence (new tensors, or one tensor
    per param rewritten in place); with closure, step(closure) sets the gradient of a fixed quadratic."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = getattr(mk, op)(params, lr=1e-2, track_memory=track_memory, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.zeros_like(p) for p in params]
    out = []
    for _ in range(steps):
        noise = [torch.randn(p.shape, generator=gen) for p in params]

        def set_grads() -> None:
            for p, g, e in zip(params, grads, noise):
                value = 2.0 * p.detach() + e if closure else e
                if inplace:
                    p.grad = g.copy_(value)
                else:
                    p.grad = value.clone()

        set_grads()
        opt.step(set_grads if closure else None)
        out.append((opt.memory_stats()[0], [p.detach().clone() for p in params], opt))
    return out


def _same_stats(a: dict, b: dict, rel: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=rel, nan_ok=True) for k in a)


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("op,inplace,hvp,maximize", [
    ("AdamW", False, "trajectory", False), ("AdamW", True, "trajectory", False), ("AdamW", False, "auto", True),
    ("Lion", False, "trajectory", False), ("AdamW", False, "probe", False)])
def test_a_sampled_step_measures_what_every_step_measures(backend, op, inplace, hvp, maximize):
    closure = hvp == "probe"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        every = _run(True, backend=backend, op=op, inplace=inplace, closure=closure, hvp=hvp, maximize=maximize)
        sampled = _run(EVERY, backend=backend, op=op, inplace=inplace, closure=closure, hvp=hvp, maximize=maximize)
    written = [w for w in caught if "written in place before it" in str(w.message)]
    assert len(written) == (1 if inplace and not closure else 0)
    last = None
    for n, ((stats_every, params_every, _), (stats, params, _)) in enumerate(zip(every, sampled)):
        assert all(torch.equal(a, b) for a, b in zip(params_every, params)), f"params differ after step {n + 1}"
        assert stats["step"] == EVERY * (n // EVERY) + 1
        if n % EVERY == 0:
            last = stats_every
        if inplace and EVERY <= n < 2 * EVERY:  # the first sample finds its kept gradient overwritten: no estimate
            assert stats["correction_norm"] == 0.0 and stats["memory_effect"] == last["memory_effect"]
            continue
        # the probe's tau comes from the norms of its last probe (k steps back when sampled): H d agrees to ~1e-4
        assert _same_stats(stats, last, 1e-3 if closure else 0.0), f"step {n + 1}: {stats} != {last}"
    measured = [s for s, _, _ in sampled if s["step"] > (EVERY + 1 if inplace else 1)]
    assert measured and all(s["memory_effect"] > 0 for s in measured)
    if op == "AdamW" and not closure:  # an estimate (sign Lion's M is 0): the step before's gradient kept
        assert all(s["correction_norm"] > 0 for s in measured)


def test_between_samples_no_previous_gradient_is_held():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = _run(4, backend="numba", inplace=True, hvp="trajectory", steps=6)
    opt = runs[-1][2]
    # steps 1..6: measured 1 and 5, the gradient of step 4 copied for 5; after step 6 none is held
    assert all("prev_grad" not in opt.state[p] for p in opt.param_groups[0]["params"])
    assert not opt._sampled.kept


def test_a_correction_measures_every_step_whatever_track_memory_says():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        every = _run(True, backend="numba", memory_correction=-1.0, hvp="trajectory", steps=5)
        sampled = _run(EVERY, backend="numba", memory_correction=-1.0, hvp="trajectory", steps=5)
    assert [s["step"] for s, _, _ in sampled] == [1, 2, 3, 4, 5]
    assert all(_same_stats(a, b) for (a, _, _), (b, _, _) in zip(every, sampled))


@pytest.mark.parametrize("value", [-1, 1.5, "yes", None])
def test_track_memory_must_be_a_bool_or_a_count(value):
    with pytest.raises(ValueError, match="track_memory must be a bool or an integer"):
        mk.AdamW([torch.nn.Parameter(torch.zeros(3))], track_memory=value)


def test_sampling_refuses_a_reused_estimate_without_a_correction():
    with pytest.raises(ValueError, match="track_memory=4 measures one step in 4"):
        mk.AdamW([torch.nn.Parameter(torch.zeros(3))], track_memory=4, hvp="probe", hvp_every=2)
    mk.AdamW([torch.nn.Parameter(torch.zeros(3))], track_memory=4, hvp="probe", hvp_every=2, memory_correction=-1.0)


def test_zero_tracks_nothing():
    opt = mk.AdamW([torch.nn.Parameter(torch.zeros(3))], track_memory=0)
    with pytest.raises(RuntimeError, match="memory_stats\\(\\) needs"):
        opt.memory_stats()


def test_a_sampled_step_under_an_amp_scale_reads_the_unscaled_gradient():
    """The scale changes between the step that copies and the sampled step: the copy is unscaled by its own."""
    stats = []
    for track in (True, 2):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
        opt = mk.AdamW(params, lr=1e-2, track_memory=track, backend="numba", hvp="trajectory")
        gen = torch.Generator().manual_seed(1)
        for n in range(3):
            opt.grad_scale = torch.tensor(2.0 ** (10 + n))  # as GradScaler sets it
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * opt.grad_scale
            opt.step()
        stats.append(opt.memory_stats()[0])
    assert stats[1]["step"] == 3 and stats[1]["correction_norm"] > 0
    assert _same_stats(stats[1], stats[0], 1e-5)


def test_bf16_buffers_sample_from_a_rounded_copy():
    """With bfloat16 buffers the step before a sample copies its gradients into bfloat16 (to nearest, where the
    every-step trajectory rounds its buffer stochastically): the sampled figures agree to bfloat16's precision."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        every = _run(True, backend="numba", hvp="trajectory", state_dtype=torch.bfloat16, steps=4)
        sampled = _run(EVERY, backend="numba", hvp="trajectory", state_dtype=torch.bfloat16, steps=4)
    stats, reference = sampled[-1][0], every[-1][0]
    assert stats["step"] == reference["step"] == 4 and stats["correction_norm"] > 0
    assert stats["correction_norm"] == pytest.approx(reference["correction_norm"], rel=2e-2)
    assert stats["update_norm"] == reference["update_norm"]
