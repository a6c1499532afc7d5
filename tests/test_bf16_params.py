"""bfloat16 params without float32 master weights (issue 20; docs/DESIGN.md, "Compact states"): kahan=True
(compensated writes, reference.kahan) and param_rounding="stochastic".

The ops: every backend that runs here writes each bfloat16 param (and its compensation) as reference.kahan or
rounding.round_bf16 makes it from that backend's own float32 step result, bit for bit, in every op and in the
plain, trajectory-correction and probe (a step from origins) modes, under two seeds; the states, grad_refs and
kept estimates are the reference's bits; and wherever a backend's float32 step equals the reference's (the float32
math of torch and the kernels may differ in the last bit, test_parity's tolerance) its params and compensations
are the reference backend's bits. The probe pass leaves compensations alone.
The optimizers, against an independent float64 torch.optim.AdamW run: bfloat16 params rounded to nearest stall
where every update is below half an ulp; Kahan's p + c tracks float64 far closer; stochastically rounded params
are unbiased (the mean over seeds tracks float64). Bad input raises by name and changes nothing; checkpoints
round trip, with and without a compensation; CUDA's kernels refuse by name and "auto" passes them over.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import memkernels as mk
from memkernels import _ops, backends, reference
from memkernels.ops import SPECS
from memkernels.ops.rounding import key_of_write, random_bits, round_bf16, tensor_keys
from test_parity import BACKENDS, PROBE_GRADIENT, TAU, TRAJECTORY, make_inputs

SEEDS = (0, 12345)
# (name, op arguments, with grad_refs, with diagnostics, from origins)
MODES = [("plain", {}, False, False, False),
         ("trajectory", TRAJECTORY, True, True, False),
         ("probe", dict(PROBE_GRADIENT, probe_tau=TAU), True, True, True)]
WRITES = ("kahan", "stochastic")
OPTIMIZERS = {"adamw": mk.AdamW, "lion": mk.Lion, "sgd": mk.SGD, "ademamix": mk.AdEMAMix}


def _keys(op: str, seed: int, n: int) -> torch.Tensor:
    columns = _ops.KEY_COLUMNS[op]
    return tensor_keys(seed, 1, torch.arange(n * columns, dtype=torch.int64).reshape(n, columns))


def _inputs(op: str, kwargs: dict, refs: bool, origins: bool, seed: int) -> dict:
    """bfloat16 params and states, and compensations of a few bfloat16 ulps' magnitude of theta."""
    inputs = make_inputs(op, kwargs, torch.bfloat16, torch.bfloat16, refs=refs, seed=seed, origins=origins)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs["compensations"] = [(torch.randn(p.shape, generator=gen) * 1e-3).bfloat16() for p in inputs["params"]]
    return inputs


def _call(op: str, backend: str, inputs: dict, kwargs: dict, diagnostics: bool, write: str | None,
          keys: torch.Tensor | None, param_dtype: torch.dtype = torch.bfloat16) -> dict:
    """The op on copies of the inputs, params (and grads, origins) in param_dtype; what it wrote."""
    copy_of = lambda lst, dt=None: [t.to(dt, copy=True) if dt else t.clone() for t in lst]  # noqa: E731
    params, states = copy_of(inputs["params"], param_dtype), [copy_of(s) for s in inputs["states"]]
    grad_refs, origins, compensations = (copy_of(inputs["grad_refs"]), copy_of(inputs["origins"], param_dtype),
                                         copy_of(inputs["compensations"]))
    extra = {"kahan": dict(compensations=compensations), "stochastic": dict(param_rounding="stochastic"),
             None: {}}[write]
    tau = {"probe_tau": torch.tensor(kwargs["probe_tau"], dtype=torch.float64)} if "probe_tau" in kwargs else {}
    getattr(_ops, op + "_")(params, copy_of(inputs["grads"], param_dtype), *states, grad_refs,
                            torch.zeros(len(reference.DIAGNOSTICS), dtype=torch.float64) if diagnostics else None,
                            backend=backend, origins=origins, rounding_keys=keys,
                            **{**SPECS[op].examples, **kwargs, **tau, **extra})
    return {"params": params, "compensations": compensations, "states": [t for s in states for t in s],
            "grad_refs": grad_refs}


def _bits(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.view(torch.int16) for t in tensors]


def _expected(op: str, write: str, inputs: dict, stepped: list[torch.Tensor], keys: torch.Tensor, from_origins: bool
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The params and compensations that `write` makes from float32 step results `stepped` (stochastic: the
    params' write number follows the op's states, grad_refs and hvps; rounding.key_of_write)."""
    column, shift = key_of_write(len(SPECS[op].states) + 2)
    thetas = inputs["origins"] if from_origins else inputs["params"]
    params, compensations = [], []
    for i, (theta, p_new, c) in enumerate(zip(thetas, stepped, inputs["compensations"])):
        if write == "kahan":
            q, c = reference.kahan(theta.float(), p_new, c.float())
            params.append(q.bfloat16())
            compensations.append(c.bfloat16())
        else:
            index = torch.arange(p_new.numel(), dtype=torch.int64).reshape(p_new.shape)
            params.append(round_bf16(p_new, random_bits(int(keys[i, column]), index) >> shift))
            compensations.append(c)
    return params, compensations


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("name,kwargs,refs,diagnostics,from_origins", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("op", list(SPECS))
def test_every_backend_writes_bf16_params_as_the_reference(op, name, kwargs, refs, diagnostics, from_origins, write,
                                                           seed):
    inputs = _inputs(op, kwargs, refs, from_origins, seed)
    keys = _keys(op, seed, len(inputs["params"]))
    expected = _call(op, "reference", inputs, kwargs, diagnostics, write, keys)
    reference_step = _call(op, "reference", inputs, kwargs, diagnostics, None, keys, torch.float32)["params"]
    want = _expected(op, write, inputs, reference_step, keys, from_origins)
    assert all(torch.equal(a, b) for a, b in zip(_bits(expected["params"]), _bits(want[0])))
    assert all(torch.equal(a, b) for a, b in zip(_bits(expected["compensations"]), _bits(want[1])))
    moved = sum(int((a != b).sum()) for a, b in zip(expected["params"], inputs["params"]))
    assert moved > 0
    for backend in BACKENDS:
        actual = _call(op, backend, inputs, kwargs, diagnostics, write, keys)
        own_step = _call(op, backend, inputs, kwargs, diagnostics, None, keys, torch.float32)["params"]
        params, compensations = _expected(op, write, inputs, own_step, keys, from_origins)
        for key, want_list in (("params", params), ("compensations", compensations)):
            for i, (a, e) in enumerate(zip(actual[key], want_list, strict=True)):
                assert a.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), e.view(torch.int16)), \
                    f"{backend}: {key}[{i}]"
        for key in ("states", "grad_refs"):
            for i, (a, e) in enumerate(zip(actual[key], expected[key], strict=True)):
                assert torch.equal(a.view(torch.int16), e.view(torch.int16)), f"{backend}: {key}[{i}]"
        agree = 0
        for own, ref, a, e, ac, ec in zip(own_step, reference_step, actual["params"], expected["params"],
                                          actual["compensations"], expected["compensations"]):
            same = own == ref
            agree += int(same.sum())
            assert torch.equal(a.view(torch.int16)[same], e.view(torch.int16)[same])
            assert torch.equal(ac.view(torch.int16)[same], ec.view(torch.int16)[same])
        assert agree > 0.9 * sum(p.numel() for p in own_step)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_the_probe_pass_leaves_compensations_and_writes_theta_plus_tau_d_to_nearest(backend):
    op = "adamw"
    inputs = _inputs(op, {}, False, True, 0)
    kwargs = dict(probe=True, probe_tau=TAU)
    plain = _call(op, backend, inputs, kwargs, False, None, None)
    kahan = _call(op, backend, inputs, kwargs, False, "kahan", None)
    assert all(torch.equal(a, b) for a, b in zip(_bits(plain["params"]), _bits(kahan["params"])))
    assert all(torch.equal(a, b) for a, b in zip(_bits(kahan["compensations"]), _bits(inputs["compensations"])))


# ---------------------------------------------------------------- the optimizers against float64

N, STEPS, LR = 4096, 300, 1e-4


def _start() -> torch.Tensor:
    """Params in [1, 2), where a bfloat16 ulp is 2**-7: Adam's updates of about lr are far below its half."""
    gen = torch.Generator().manual_seed(7)
    return (1.0 + torch.rand(N, generator=gen, dtype=torch.float64)).bfloat16()


def _grads() -> list[torch.Tensor]:
    """A fixed gradient sequence, mostly negative (params drift up by about lr a step), the same for every run."""
    gen = torch.Generator().manual_seed(8)
    return [-1.0 + 0.5 * torch.randn(N, generator=gen, dtype=torch.float64) for _ in range(STEPS)]


def _train(make, dtype: torch.dtype, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    p = torch.nn.Parameter(_start().to(dtype))
    opt = make([p])
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
    return p.detach(), opt


def test_kahan_params_track_float64_where_nearest_ones_stall():
    grads = _grads()
    exact, _ = _train(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.0), torch.float64, grads)
    nearest, _ = _train(lambda ps: mk.AdamW(ps, lr=LR, weight_decay=0.0, backend="numba"), torch.bfloat16, grads)
    kahan, opt = _train(lambda ps: mk.AdamW(ps, lr=LR, weight_decay=0.0, backend="numba", kahan=True),
                        torch.bfloat16, grads)
    start = _start().double()
    assert (exact - start).abs().mean() > 2 ** -7  # float64 moved by more than an ulp on average
    assert torch.equal(nearest, _start())  # every update below half an ulp: nothing moved
    compensated = kahan.double() + opt.state[opt.param_groups[0]["params"][0]]["compensation"].double()
    kahan_error, nearest_error = (compensated - exact).abs(), (nearest.double() - exact).abs()
    assert kahan_error.max() * 10 <= nearest_error.mean()
    assert kahan_error.mean() * 100 <= nearest_error.mean()
    assert (kahan - _start()).abs().double().mean() > 2 ** -7  # the bfloat16 params themselves moved


def test_stochastic_params_are_unbiased():
    grads = _grads()
    exact, _ = _train(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.0), torch.float64, grads)
    seeds = 8
    runs = torch.stack([_train(lambda ps: mk.AdamW(ps, lr=LR, weight_decay=0.0, backend="numba", seed=seed,
                                                   param_rounding="stochastic"), torch.bfloat16, grads)[0].double()
                        for seed in range(seeds)])
    nearest_error = (_start().double() - exact).abs().mean()
    error = runs.mean(0) - exact
    # Adam's updates do not depend on p here (no weight decay), so a run's error is the sum of its roundings: each
    # unbiased, of variance u (ulp - u) <= lr ulp for an update u of about lr and ulp <= 2**-6 (params below 4)
    assert error.abs().mean() * 2.5 <= nearest_error
    assert abs(float(error.mean())) <= 6 * (STEPS * LR * 2 ** -6 / (seeds * N)) ** 0.5
    assert not torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------- bad input, checkpoints, CUDA


def _params(dtype: torch.dtype = torch.bfloat16) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in ((40, 30), (70,))]


def _steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], n: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def _snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params] + [v.clone() for st in opt.state.values() for v in st.values()
                                                   if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("bad,match", [
    (dict(kahan=True), "kahan=True needs bfloat16 parameters"),
    (dict(param_rounding="stochastic"), "param_rounding='stochastic' needs bfloat16 parameters")])
def test_bf16_param_options_refuse_other_params(bad, match):
    with pytest.raises(ValueError, match=match):
        mk.AdamW(_params(torch.float32), **bad)


@pytest.mark.parametrize("bad,match", [
    (dict(kahan=True, param_rounding="stochastic"), "kahan=True with param_rounding='stochastic'"),
    (dict(param_rounding="up"), "param_rounding must be one of"),
    (dict(kahan=1), "kahan must be a bool")])
def test_a_step_refused_for_its_param_options_changes_nothing(bad, match):
    with pytest.raises(ValueError, match=match):
        mk.AdamW(_params(), **bad)
    params = _params()
    opt = mk.AdamW(params, lr=1e-2, backend="numba", kahan=True)
    _steps(opt, params, 2)
    before = _snapshot(opt, params)
    opt.param_groups[0].update(bad)
    with pytest.raises(ValueError, match=match):
        _steps(opt, params, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(opt, params), strict=True))


def test_a_step_refused_for_float32_params_under_kahan_changes_nothing():
    params = _params(torch.float32)
    opt = mk.AdamW(params, lr=1e-2, backend="numba")
    _steps(opt, params, 1)
    before = _snapshot(opt, params)
    opt.param_groups[0]["kahan"] = True
    with pytest.raises(ValueError, match="kahan=True needs bfloat16 parameters"):
        _steps(opt, params, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(opt, params), strict=True))


def test_the_ops_refuse_bad_param_writes_by_name():
    op = "adamw"
    inputs = _inputs(op, {}, False, False, 0)
    keys = _keys(op, 0, len(inputs["params"]))
    for backend in ("reference", *BACKENDS):
        with pytest.raises(ValueError, match="param_rounding='stochastic' needs rounding_keys"):
            _call(op, backend, inputs, {}, False, "stochastic", None)
        with pytest.raises(ValueError, match="param_rounding must be one of"):
            _call(op, backend, inputs, dict(param_rounding="down"), False, None, keys)
        with pytest.raises(ValueError, match="with compensations"):
            _call(op, backend, inputs, dict(param_rounding="stochastic"), False, "kahan", keys)
        with pytest.raises(TypeError, match="compensations are the Kahan compensations of bfloat16 params"):
            _call(op, backend, inputs, {}, False, "kahan", None, torch.float32)
        with pytest.raises(ValueError, match="param_rounding='stochastic' needs bfloat16 params"):
            _call(op, backend, inputs, {}, False, "stochastic", keys, torch.float32)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_kahan_checkpoints_round_trip(name):
    make = lambda ps: OPTIMIZERS[name](ps, lr=1e-3, backend="numba", kahan=True)  # noqa: E731
    params = _params()
    opt = make(params)
    _steps(opt, params, 3)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = make(twin)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all("compensation" in st for st in loaded.state.values())
    assert any(bool(st["compensation"].ne(0).any()) for st in loaded.state.values())
    _steps(opt, params, 2, seed=2)
    _steps(loaded, twin, 2, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(opt, params), _snapshot(loaded, twin), strict=True))


def test_a_checkpoint_without_compensation_loads_into_kahan_and_one_with_it_into_plain():
    params = _params()
    plain = mk.AdamW(params, lr=1e-3, backend="numba")
    _steps(plain, params, 2)
    kahan = mk.AdamW(params, lr=1e-3, backend="numba", kahan=True)
    kahan.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert kahan.param_groups[0]["kahan"] and not any("compensation" in st for st in kahan.state.values())
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = mk.AdamW(twin, lr=1e-3, backend="numba", kahan=True)
    fresh.load_state_dict(copy.deepcopy(plain.state_dict()))
    fresh.state[twin[0]]["compensation"] = torch.zeros_like(twin[0])  # what the first step makes
    fresh.state[twin[1]]["compensation"] = torch.zeros_like(twin[1])
    _steps(kahan, params, 1)
    _steps(fresh, twin, 1)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(kahan, params), _snapshot(fresh, twin), strict=True))
    back = mk.AdamW(params, lr=1e-3, backend="numba")
    back.load_state_dict(copy.deepcopy(kahan.state_dict()))
    assert not back.param_groups[0]["kahan"] and not any("compensation" in st for st in back.state.values())
    _steps(back, params, 1)


def test_cuda_refuses_bf16_param_writes_by_name_and_auto_passes_it_over(monkeypatch):
    """CUDA cannot run here: a kernel registered as CUDA's, without the capability, stands in for its kernels."""
    op = "adamw"
    inputs = _inputs(op, {}, False, False, 0)
    calls = []
    stand_in = backends.register("cuda", op, ())(lambda *args, **kwargs: calls.append(kwargs))
    for device_type in ("cpu", "cuda"):
        monkeypatch.setitem(backends._kernels, (op, "cuda", device_type), stand_in)
    monkeypatch.setattr(backends, "_warned", set())
    keys = _keys(op, 0, len(inputs["params"]))
    for write, call_keys in (("kahan", None), ("stochastic", keys)):
        with pytest.raises(ValueError, match="backend cuda: kahan / stochastic parameter rounding is not implemented"):
            _call(op, "cuda", inputs, {}, False, write, call_keys)
    assert calls == []
    _call(op, "cuda", inputs, {}, False, None, None)
    assert len(calls) == 1 and "compensations" not in calls[0] and "param_rounding" not in calls[0]
    after_cuda = "triton" if backends.has_kernel(op, "triton", "cuda") else "reference"
    with pytest.warns(RuntimeWarning, match="backend 'cuda' skipped on cuda: kahan / stochastic parameter rounding"):
        assert backends.resolve(op, "auto", "cuda", bf16_params=True)[0] == after_cuda
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backends.resolve(op, "auto", "cpu", bf16_params=True)[0] == "numba"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_probe_estimate_of_h_d_holds_for_bf16_params(dtype):
    """On a quadratic, H d is known: the probe's estimate kept in the state (hvp_every=2) matches it in float64,
    and for bfloat16 params is not swamped by their rounding (its displacement is sized for them, optim/_hvp.py)."""
    torch.manual_seed(0)
    n = 4096
    a = torch.rand(n, dtype=torch.float64) + 0.5  # loss = 0.5 sum a theta^2: H = diag(a)
    p = torch.nn.Parameter((0.05 * torch.randn(n)).to(dtype))
    opt = mk.AdamW([p], lr=1e-3, weight_decay=0.0, memory_correction=-1.0, hvp="probe", hvp_every=2,
                   backend="reference", kahan=dtype == torch.bfloat16)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (a.to(torch.float32) * p.float() ** 2).sum()
        loss.backward()
        return loss

    closure()
    d = (p.grad.double() / (p.grad.double().abs() + 1e-8))  # AdamW's memoryless direction g / (|g| + eps)
    opt.step(closure)
    estimate = opt.state[p]["hvp"].double()
    exact = a * d
    error = torch.linalg.norm(estimate - exact) / torch.linalg.norm(exact)
    # float32: the finite difference's own error. bfloat16: the rounding of theta + tau d, with tau sized between
    # float32's and bfloat16's precision (optim/_hvp.py); one sized for float32 alone is 96% off here
    assert error < (1e-3 if dtype == torch.float32 else 0.5), (dtype, error)
