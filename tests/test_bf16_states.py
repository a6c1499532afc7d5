"""bfloat16 optimizer states with stochastic rounding (issue 20; docs/DESIGN.md, "Compact states").

The ops: each kernel backend that runs here (numba; Triton under TRITON_INTERPRET=1) gives the reference's bits
for every stochastically rounded write (states, updated grad_refs, kept estimates) in every op and mode, under
several seeds, with keys on both sides of 2**31; params, whose float32 math may differ in the last bit between
torch and the kernels, within test_parity's tolerance. The rounding: unbiased in one step (the mean
over seeds of each bfloat16 state against the float32 state the same math gives, within a bound from its two
bfloat16 neighbours); seeds change the bits and one seed repeats them. The optimizers: round-to-nearest
reproduces the bf16 storage of before bit for bit; an EMA of v built to stall under round-to-nearest does, and
stochastic rounding follows float32 there; training tracks float32 states; bad input raises and changes
nothing; checkpoints round trip between bfloat16 and float32 states and from torch.optim.AdamW.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import memkernels as mk
from memkernels import _ops, backends
from memkernels.backends.numba import kernels as numba_kernels
from memkernels.ops import SPECS
from memkernels.ops.rounding import tensor_key, tensor_keys
from memkernels.optim import _compact
from test_parity import BACKENDS, PROBE_GRADIENT, TAU, TRAJECTORY, TOLERANCE, assert_close, make_inputs, run
from _training import X, Y, batches, mlp, train
from test_compile import compiled_step

OPTIMIZERS = {"adamw": mk.AdamW, "lion": mk.Lion, "sgd": mk.SGD, "ademamix": mk.AdEMAMix}
SEEDS = (0, 12345)
# (name, op arguments, with grad_refs, with diagnostics, with kept estimates)
MODES = [("plain", {}, False, False, False),
         ("diagnostics", {}, False, True, False),
         ("trajectory", TRAJECTORY, True, True, False),
         ("probe_estimate_kept", dict(PROBE_GRADIENT, probe_tau=TAU), True, True, True),
         ("kept_hvp_reused", dict(PROBE_GRADIENT, probe_tau=TAU, reuse_hvp=True), False, True, True)]


def keys(op: str, seed: int, step: int = 1, n: int = 4) -> torch.Tensor:
    columns = _ops.KEY_COLUMNS[op]
    return tensor_keys(seed, step, torch.arange(n * columns, dtype=torch.int64).reshape(n, columns))


def bf16_inputs(op: str, kwargs: dict, refs: bool, hvps: bool) -> dict:
    return make_inputs(op, kwargs, torch.float32, torch.bfloat16, refs=refs, seed=3, origins="probe_tau" in kwargs,
                       hvps=hvps)


def test_tensor_keys_are_tensor_key():
    tensors = torch.tensor([0, 1, 7, 2 ** 32 + 5, 2 ** 62])
    assert tensor_keys(9, 2 ** 40, tensors).tolist() == [tensor_key(9, 2 ** 40, int(t)) for t in tensors]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("op", list(SPECS))
@pytest.mark.parametrize("name,kwargs,refs,diagnostics,hvps", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_round_as_the_reference_bit_for_bit(backend, op, name, kwargs, refs, diagnostics, hvps, seed):
    inputs = bf16_inputs(op, kwargs, refs, hvps)
    call = dict(kwargs, rounding_keys=keys(op, seed))
    assert (call["rounding_keys"] >= 1 << 31).any() and (call["rounding_keys"] < 1 << 31).any()
    expected = run(op, "reference", inputs, call, diagnostics)
    actual = run(op, backend, inputs, call, diagnostics)
    nearest = run(op, "reference", inputs, kwargs, diagnostics)
    for key in ("states", "grad_refs", "hvps"):
        for i, (a, e) in enumerate(zip(actual[key], expected[key], strict=True)):
            assert a.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), e.view(torch.int16)), f"{key}[{i}]"
    for i, (a, e) in enumerate(zip(actual["params"], expected["params"], strict=True)):
        assert_close(a, e, f"params[{i}]", TOLERANCE[torch.float32])
    # the keys were used: some written bfloat16 element differs from round-to-nearest
    written = [k for k in ("states", "grad_refs", "hvps") if k != "hvps" or not kwargs.get("reuse_hvp")]
    assert any(not torch.equal(a, b) for k in written for a, b in zip(expected[k], nearest[k]))


@pytest.mark.parametrize("op", list(SPECS))
def test_seeds_change_the_bits_and_one_seed_repeats_them(op):
    inputs = bf16_inputs(op, TRAJECTORY, True, False)

    def states(seed: int) -> list[torch.Tensor]:
        out = run(op, "numba", inputs, dict(TRAJECTORY, rounding_keys=keys(op, seed)), True)
        return out["states"] + out["grad_refs"]

    first, again, other = states(SEEDS[0]), states(SEEDS[0]), states(SEEDS[1])
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    big = [(a, b) for a, b in zip(first, other) if a.numel() > 1000]
    assert big and all(not torch.equal(a, b) for a, b in big)


def test_every_pair_of_lists_of_every_param_at_every_step_has_its_own_key():
    """The optimizer's keys (_compact.keys): distinct over params, key columns (two writes each) and steps, and
    the same for a param whatever the other params of its call (bucketing)."""
    columns = _ops.KEY_COLUMNS["ademamix"]
    cpu, cache = torch.device("cpu"), {}
    calls = [_compact.keys(7, step, [0, 1, 2, 5], columns, cpu, cache) for step in (1, 2, 3)]
    flat = torch.cat([k.flatten() for k in calls])
    assert flat.unique().numel() == flat.numel()
    alone = _compact.keys(7, 2, [5], columns, cpu, cache)
    assert torch.equal(alone[0], calls[1][3])
    assert alone[0, 0].item() == tensor_key(7, 2, 5 * _compact.SLOTS)


@pytest.mark.parametrize("step", [1, 2, 2 ** 32 + 3, 2 ** 40 + 7])
def test_device_mode_keys_are_host_mode_keys(step):
    """A step count tensor (device mode) gives the keys of the same count as a host int, both of its words."""
    columns = _ops.KEY_COLUMNS["adamw"]
    want = _compact.keys(7, step, [0, 3], columns, torch.device("cpu"), {})
    got = _compact.keys(7, torch.tensor(step), [0, 3], columns, torch.device("cpu"), {})
    assert got.dtype == torch.int64 and torch.equal(got, want)
    if step < 1 << 24:  # exact in float32, the dtype of an optimizer's count
        assert torch.equal(_compact.keys(7, torch.tensor(float(step)), [0, 3], columns, torch.device("cpu"), {}),
                           want)


@pytest.mark.parametrize("op", list(SPECS))
def test_stochastic_rounding_is_unbiased_in_a_step(op):
    """The mean over K seeds of each bfloat16 state against the float32 state the same step makes from the same
    (bfloat16) inputs: each element's rounding is its lower or upper bfloat16 neighbour, the upper with
    probability p = its distance from the lower / their spacing, so the mean is within 6 standard deviations,
    6 spacing sqrt(max(p (1 - p), 1/K) / K) (1/K: where p is so small that a single draw of the upper one is
    already an outlier of the normal approximation)."""
    k = 200
    inputs = make_inputs(op, {}, torch.float32, torch.bfloat16, refs=False, seed=4)
    inputs = dict(inputs, params=inputs["params"][:1], grads=inputs["grads"][:1],
                  states=[s[:1] for s in inputs["states"]])
    exact = run(op, "reference", dict(inputs, states=[[t.float() for t in s] for s in inputs["states"]]), {}, False)
    total = [torch.zeros_like(e, dtype=torch.float64) for e in exact["states"]]
    for seed in range(k):
        out = run(op, "numba", inputs, dict(rounding_keys=keys(op, seed, n=1)), False)
        for t, s in zip(total, out["states"]):
            t += s.double()
    for t, e in zip(total, exact["states"]):
        low_word = e.view(torch.int32) & ~0xFFFF
        lower, upper = low_word.view(torch.float32).double(), (low_word + 0x10000).view(torch.float32).double()
        spacing = (upper - lower).abs()
        p = (e.double() - lower).abs() / spacing
        bound = 6 * spacing * torch.sqrt(torch.maximum(p * (1 - p), torch.tensor(1 / k)) / k)
        mean = t / k
        assert ((mean - e.double()).abs() <= bound).all(), f"{((mean - e.double()).abs() / bound).max().item()}"
        assert (mean != e.to(torch.bfloat16).double()).any()  # not round-to-nearest's value everywhere


# ------------------------------------------------------------------ the optimizers


def _steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], n: int, seed: int = 1,
           scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
        opt.step()


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in ((3000,), (7, 5), (1,))]


def _bits(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t.clone() for st in opt.state.values() for t in st.values()]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nearest_is_the_bf16_storage_of_before_bit_for_bit(name):
    """bf16 params kept their states in bf16 rounded to nearest before state_dtype existed (the default still
    does): state_dtype=torch.bfloat16 with state_rounding="nearest" gives those bits, with the trajectory
    correction's previous gradients too."""
    runs = []
    for extra in ({}, dict(state_dtype=torch.bfloat16, state_rounding="nearest")):
        params = _params(torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the regime warning of random gradients
            opt = OPTIMIZERS[name](params, lr=1e-2, memory_correction=-1.0, hvp="trajectory", backend="numba",
                                   **extra)
            _steps(opt, params, 4)
        runs.append(([p.detach().clone() for p in params], _bits(opt)))
    (p0, s0), (p1, s1) = runs
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert len(s0) == len(s1) and all(torch.equal(a.float(), b.float()) for a, b in zip(s0, s1))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["plain", "trajectory", "probe_every_2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_and_reference_optimizers_keep_the_same_bf16_states(backend, name, mode):
    """Three steps of each optimizer with bf16 states rounded stochastically, on a kernel backend and on the
    reference: every state the same bits (params within the parity tolerance: the gradients are fixed, not
    recomputed)."""
    kwargs = {"plain": {}, "trajectory": dict(memory_correction=-1.0, hvp="trajectory"),
              "probe_every_2": dict(track_memory=True, hvp="probe", hvp_every=2)}[mode]
    out = []
    for runs_on in ("reference", backend):
        params = _params()
        opt = OPTIMIZERS[name](params, lr=1e-3, backend=runs_on, state_dtype=torch.bfloat16, seed=5, **kwargs)
        gen = torch.Generator().manual_seed(1)
        grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(3)]
        for step in range(3):
            def closure(step=step):
                for p, g in zip(params, grads[step]):
                    p.grad = g + 1e-3 * p.detach()  # a gradient that depends on p, for the probe
                return torch.tensor(0.0)
            closure()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step(closure if mode == "probe_every_2" else None)
        out.append((params, opt))
    (ref_params, ref), (kernel_params, kernel) = out
    for p, q in zip(ref_params, kernel_params):
        assert ref.state[p].keys() == kernel.state[q].keys()
        for key, value in ref.state[p].items():
            if key != "step":
                assert value.dtype == torch.bfloat16 and torch.equal(value, kernel.state[q][key]), key
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["plain", "trajectory"])
def test_numba_rounds_as_the_reference_past_its_first_chunk(mode):
    """numba counts an element's index from each block's start (a chunk's, or a 256-element sub-block's with
    diagnostics): one param of three chunks and a part, stepped twice, keeps the reference's bf16 bits."""
    kwargs = dict(memory_correction=-1.0, hvp="trajectory") if mode == "trajectory" else {}
    n = 2 * numba_kernels.CHUNK + 1000
    out = []
    for backend in ("reference", "numba"):
        p = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(0)))
        opt = mk.AdamW([p], lr=1e-3, backend=backend, state_dtype=torch.bfloat16, seed=7, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the regime warning of random gradients
            _steps(opt, [p], 2)
        out.append((p, opt.state[p]))
    (p_ref, ref), (p_numba, numba) = out
    assert ref.keys() == numba.keys()
    for key, value in ref.items():
        if key != "step":
            assert value.dtype == torch.bfloat16 and torch.equal(value, numba[key]), key
    torch.testing.assert_close(p_ref, p_numba, rtol=1e-5, atol=1e-6)


def test_an_ema_of_v_stalls_rounded_to_nearest_and_follows_float32_rounded_stochastically():
    """AdamW's v (beta2 = 0.999) after 300 steps of gradients of scale 1e-2, then 700 steps of zero gradients:
    in float32 it decays by 0.999 a step (to about half); rounded to nearest each decrease, 1e-3 of v, is under
    half a bfloat16 ulp (2**-9 of v at least), so v never moves; rounded stochastically its mean follows float32
    (within 2%: each element's rounding errors are independent, ~5% over 700 steps, ~0.1% in the mean)."""
    v = {}
    for label, extra in (("fp32", {}), ("nearest", dict(state_dtype=torch.bfloat16, state_rounding="nearest")),
                         ("stochastic", dict(state_dtype=torch.bfloat16))):
        p = torch.nn.Parameter(torch.zeros(4096))
        opt = mk.AdamW([p], lr=1e-6, weight_decay=0.0, backend="numba", **extra)
        _steps(opt, [p], 300, scale=1e-2)
        before = opt.state[p]["exp_avg_sq"].clone()
        _steps(opt, [p], 700, scale=0.0)
        v[label] = (before, opt.state[p]["exp_avg_sq"])
    fp32 = v["fp32"][1].double().mean()
    assert torch.equal(v["nearest"][0], v["nearest"][1])  # stalled: not one element moved
    assert 0.45 < fp32 / v["fp32"][0].double().mean() < 0.55
    assert abs(v["stochastic"][1].double().mean() / fp32 - 1) < 0.02


def test_training_with_bf16_stochastic_states_tracks_float32_states():
    """500 minibatch steps of AdamW on the digits MLP (tests/_training.py): the final loss on the whole data set
    with bf16 states rounded stochastically within 5% (relative) of float32 states'."""
    losses = {}
    for label, extra in (("fp32", {}), ("bf16", dict(state_dtype=torch.bfloat16))):
        model = mlp()
        opt = mk.AdamW(model.parameters(), lr=3e-3, backend="numba", **extra)
        train(model, opt, batches(500))
        with torch.no_grad():
            losses[label] = torch.nn.functional.cross_entropy(model(X), Y).item()
    assert losses["fp32"] < 0.5  # it learned
    assert abs(losses["bf16"] / losses["fp32"] - 1) < 0.05, losses


# ------------------------------------------------------------------ device mode


DEVICE_MODES = [(name, mode, dtype, "numba") for name in ("adamw", "lion") for mode in ("capturable", "compiled")
                for dtype in (torch.float32, torch.bfloat16)] + [("adamw", "inductor", torch.float32, "numba")] + \
    [("adamw", "capturable", dtype, backend) for backend in BACKENDS if backend != "numba"
     for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("name,mode,params_dtype,backend", DEVICE_MODES,
                         ids=[f"{n}-{m}-{str(d).removeprefix('torch.')}-{b}" for n, m, d, b in DEVICE_MODES])
def test_device_mode_rounds_as_host_mode_bit_for_bit(name, mode, params_dtype, backend):
    """Device mode derives the keys from its step count tensor, read by no host: capturable=True, and a step
    compiled whole (by inductor too, whose int64 arithmetic the keys' products stay within), keep host mode's
    bf16 states to the bit, the trajectory correction's previous gradients included (the gradients are fixed,
    so the states do not depend on the params, whose coefficients device mode evaluates in closed form). Keys
    one step off would change about half of them. bfloat16 params written stochastically: their float32 values
    before the rounding may differ by an ulp between the modes, which moves a rounding with odds of about
    2**-16, so all but a few of them keep host mode's bits too."""
    bf16_params = params_dtype == torch.bfloat16
    out = []
    for device_mode in (False, True):
        params = _params(params_dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the regime warning of random gradients
            opt = OPTIMIZERS[name](params, lr=1e-3, memory_correction=-1.0, hvp="trajectory", backend=backend,
                                   state_dtype=torch.bfloat16, seed=9, capturable=device_mode and mode == "capturable",
                                   param_rounding="stochastic" if bf16_params else "nearest")
            compiler = {"compiled": "eager", "inductor": "inductor"}.get(mode) if device_mode else None
            step = compiled_step(opt, compiler) if compiler else opt.step
            gen = torch.Generator().manual_seed(1)
            for _ in range(4):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(params_dtype)
                step()
        out.append((params, opt))
    (host_params, host), (device_params, device) = out
    for p, q in zip(host_params, device_params):
        assert float(device.state[q]["step"]) == 4
        for key, value in host.state[p].items():
            if key != "step":
                assert value.dtype == torch.bfloat16 and torch.equal(value, device.state[q][key]), key
        if bf16_params:
            assert (p != q).sum() <= 2 + p.numel() // 1000
            torch.testing.assert_close(p, q, rtol=2 ** -7, atol=1e-6)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(state_dtype=torch.float16), "state_dtype must be torch.float32 or torch.bfloat16"),
    (dict(state_dtype="bfloat16"), "state_dtype must be"),
    (dict(state_rounding="up"), "state_rounding must be one of"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(seed=1.5), "seed must be an integer"),
])
def test_bad_options_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mk.AdamW(_params(), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_bf16_states_need_float32_or_bf16_params(dtype):
    with pytest.raises(ValueError, match="state_dtype=torch.bfloat16 needs float32 or bfloat16 params"):
        mk.AdamW(_params(dtype), state_dtype=torch.bfloat16)


def test_a_step_refused_for_its_state_options_changes_nothing():
    params = _params()
    opt = mk.AdamW(params, lr=1e-2, backend="numba", state_dtype=torch.bfloat16)
    _steps(opt, params, 2)
    before = [p.detach().clone() for p in params], _bits(opt)
    for bad in (dict(state_dtype=torch.float16), dict(state_rounding="stochastically")):
        opt.param_groups[0].update(bad)
        with pytest.raises(ValueError, match="state_dtype|state_rounding"):
            opt.step()
        opt.param_groups[0].update(state_dtype=torch.bfloat16, state_rounding="stochastic")
    assert all(torch.equal(a, b) for a, b in zip(before[0], params))
    assert all(torch.equal(a, b) for a, b in zip(before[1], _bits(opt)))


def test_kernels_without_stochastic_rounding_refuse_it_and_auto_passes_them_over(monkeypatch):
    """CUDA's kernels do not round stochastically yet. CUDA cannot run here, so a kernel registered as CUDA's
    without the capability stands in for its kernels, on CPU and CUDA tensors: a stochastic call forced to it
    raises before it runs, and "auto" passes it over with a warning (to Triton where Triton takes CUDA tensors);
    a round-to-nearest call runs on it."""
    op, inputs = "adamw", bf16_inputs("adamw", {}, False, False)
    calls = []
    stand_in = backends.register("cuda", op, ())(lambda *args, **kwargs: calls.append(kwargs))
    for device_type in ("cpu", "cuda"):
        monkeypatch.setitem(backends._kernels, (op, "cuda", device_type), stand_in)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.raises(ValueError, match="backend cuda: stochastic rounding of bf16 states is not implemented"):
        run(op, "cuda", inputs, dict(rounding_keys=keys(op, 0)), False)
    assert calls == []
    run(op, "cuda", inputs, {}, False)
    assert len(calls) == 1 and "rounding_keys" not in calls[0]
    after_cuda = "triton" if backends.has_kernel(op, "triton", "cuda") else "reference"
    with pytest.warns(RuntimeWarning, match="backend 'cuda' skipped on cuda: stochastic rounding"):
        assert backends.resolve(op, "auto", "cuda", stochastic=True)[0] == after_cuda
    assert backends.resolve(op, "auto", "cuda")[0] == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backends.resolve(op, "auto", "cpu", stochastic=True)[0] == "numba"



def test_rounding_keys_of_the_wrong_shape_or_range_are_refused():
    op, inputs = "adamw", bf16_inputs("adamw", {}, False, False)
    for bad, match in ((keys(op, 0)[:, :2], "rounding_keys must be an int64 tensor of shape"),
                       (keys(op, 0).int(), "rounding_keys must be an int64 tensor"),
                       (keys(op, 0) + (1 << 32), r"rounding_keys must be in \[0, 2\*\*32\)")):
        with pytest.raises(ValueError, match=match):
            run(op, "numba", inputs, dict(rounding_keys=bad), False)


# ------------------------------------------------------------------ checkpoints


def test_checkpoints_move_between_bf16_and_float32_states():
    """A bf16-state optimizer's state_dict into a float32-state one (states widened exactly) and back (the same
    bits), each keeping its own state_dtype; the loaded optimizers step."""
    params = _params()
    bf16 = mk.AdamW(params, lr=1e-2, backend="numba", state_dtype=torch.bfloat16, memory_correction=-1.0,
                    hvp="trajectory")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _steps(bf16, params, 3)
    fp32 = mk.AdamW(params, lr=1e-2, backend="numba", memory_correction=-1.0, hvp="trajectory")
    fp32.load_state_dict(copy.deepcopy(bf16.state_dict()))
    assert fp32.param_groups[0]["state_dtype"] == torch.float32
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "prev_grad"):
            loaded, saved = fp32.state[p][key], bf16.state[p][key]
            assert loaded.dtype == torch.float32 and torch.equal(loaded, saved.float()), key
    back = mk.AdamW(params, lr=1e-2, backend="numba", state_dtype=torch.bfloat16, memory_correction=-1.0,
                    hvp="trajectory")
    back.load_state_dict(fp32.state_dict())
    assert back.param_groups[0]["state_dtype"] == torch.bfloat16
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "prev_grad"):
            assert back.state[p][key].dtype == torch.bfloat16 and torch.equal(back.state[p][key], bf16.state[p][key])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _steps(back, params, 1)
        _steps(fp32, params, 1)


def test_a_torch_adamw_checkpoint_loads_into_bf16_states():
    params = _params()
    torch_opt = torch.optim.AdamW(params, lr=1e-2)
    _steps(torch_opt, params, 3)
    opt = mk.AdamW(params, lr=1e-2, backend="numba", state_dtype=torch.bfloat16, seed=3)
    opt.load_state_dict(torch_opt.state_dict())
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], torch_opt.state[p][key].to(torch.bfloat16)), key
        assert opt.state[p]["step"].item() == 3
    _steps(opt, params, 1)
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p in params)
