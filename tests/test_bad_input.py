"""Bad input raises a clear error naming what is wrong, and a step that raises changes nothing."""
import copy
import warnings

import pytest
import torch

import memkernels as mk
from memkernels import _ops, backends

OPTIMIZERS = [getattr(mk, name) for name in mk.optim.__all__]  # every optimizer, AdEMAMix included


def _adamw_args(n=2, shape=(3, 4), dtype=torch.float32):
    params = [torch.randn(shape, dtype=dtype) for _ in range(n)]
    grads = [torch.randn(shape, dtype=dtype) for _ in range(n)]
    return params, grads, [torch.zeros(shape, dtype=dtype) for _ in range(n)], \
        [torch.zeros(shape, dtype=dtype) for _ in range(n)], []


_SCALARS = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, bias_correction1=0.1,
                bias_correction2=0.001, mean_age1=0.0, mean_age2=0.0)


def _call(params, grads, m, v, refs, diag=None, **over):
    torch.ops.memkernels.adamw_(params, grads, m, v, refs, diag, **{**_SCALARS, **over})


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a[1].pop(), ValueError, "grads has 1 tensors"),
    (lambda a: a[2].pop(), ValueError, "exp_avgs has 1 tensors"),
    (lambda a: a[4].append(torch.zeros(3, 4)), ValueError, "grad_refs has 1 tensors"),
    (lambda a: a[1].__setitem__(1, torch.randn(4, 3)), ValueError, r"grads\[1\] has shape \(4, 3\)"),
    (lambda a: a[1].__setitem__(0, torch.randn(3, 4, dtype=torch.float64)), TypeError, r"grads\[0\] has dtype"),
    (lambda a: a[1].__setitem__(0, torch.randn(3, 4).to_sparse()), TypeError, "sparse"),
    (lambda a: a[3].__setitem__(0, torch.zeros(4, 3).t()), ValueError, r"exp_avg_sqs\[0\] has strides \(1, 3\) but params\[0\] has \(4, 1\)"),
    (lambda a: a[0].__setitem__(0, a[0][0].int()), TypeError, "dtype"),
])
def test_op_rejects_bad_tensors_and_changes_nothing(mutate, error, match):
    args = list(_adamw_args())
    mutate(args)
    before = copy.deepcopy([[t for t in lst if t.device.type != "meta" and not t.is_sparse] for lst in args])
    with pytest.raises(error, match=match):
        _call(*args)
    after = [[t for t in lst if t.device.type != "meta" and not t.is_sparse] for lst in args]
    for xs, ys in zip(before, after):
        assert all(torch.equal(x, y) for x, y in zip(xs, ys))


def test_mixed_devices_are_named():
    """CPU and CUDA can't meet here, so the check the CPU and CUDA impls run is called directly."""
    params, grads, m, v, refs = _adamw_args()
    m[1] = torch.zeros(3, 4, device="meta")
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] is on meta"):
        _ops.check_tensors("adamw", params, grads, {"exp_avgs": m, "exp_avg_sqs": v}, refs, None, None, None)


@pytest.mark.parametrize("over, match", [
    (dict(lr=-1e-3), "lr"), (dict(beta1=1.0), "beta1"), (dict(beta2=-0.1), "beta2"),
    (dict(eps=0.0), "eps"), (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(correction=float("inf")), "correction"), (dict(correction=1.0), "grad_refs"),
    (dict(bias_correction1=0.0), r"bias_correction1 must be in \(0.0, 1.0\]"),
    (dict(bias_correction2=float("nan")), "bias_correction2"), (dict(mean_age1=-1.0), "mean_age1"),
    (dict(grad_scale=torch.tensor(0.0)), "grad_scale must be finite and > 0"),
    (dict(grad_scale=torch.tensor(float("nan"))), "grad_scale must be finite and > 0"),
])
def test_op_rejects_bad_scalars(over, match):
    with pytest.raises(ValueError, match=match):
        _call(*_adamw_args(), **over)


def test_op_rejects_bad_diagnostics_and_backend():
    with pytest.raises(ValueError, match="diagnostics"):
        _call(*_adamw_args(), diag=torch.zeros(3))
    with pytest.raises(ValueError, match="backend must be one of"):
        _call(*_adamw_args(), backend="fortran")


@pytest.mark.parametrize("make, match", [
    (lambda p: mk.AdamW(p, lr=-1.0), "lr"), (lambda p: mk.AdamW(p, betas=(0.9, 1.0)), "beta2"),
    (lambda p: mk.AdamW(p, betas=(0.9,)), "betas"), (lambda p: mk.AdamW(p, eps=0.0), "eps"),
    (lambda p: mk.AdamW(p, hvp="finite"), "hvp"), (lambda p: mk.AdamW(p, backend="fortran"), "backend"),
    (lambda p: mk.Lion(p, smoothing=-1.0), "smoothing"), (lambda p: mk.Lion(p, betas=(1.5, 0.9)), "beta1"),
    (lambda p: mk.SGD(p, momentum=1.0), "momentum"), (lambda p: mk.SGD(p, momentum=0.0, nesterov=True), "nesterov"),
    (lambda p: mk.SGD(p, memory_correction=float("nan")), "memory_correction"),
    (lambda p: mk.AdEMAMix(p, betas=(0.9, 0.999)), "betas"), (lambda p: mk.AdEMAMix(p, betas=(0.9, 0.999, 1.0)), "beta3"),
    (lambda p: mk.AdEMAMix(p, alpha=-1.0), "alpha"), (lambda p: mk.AdEMAMix(p, alpha=float("inf")), "alpha"),
    (lambda p: mk.AdEMAMix(p, alpha_warmup=0), "alpha_warmup"),
    (lambda p: mk.AdEMAMix(p, beta3_warmup=float("nan")), "beta3_warmup"),
    (lambda p: mk.AdEMAMix(p, beta3_warmup=100, betas=(0.0, 0.999, 0.9999)), "beta3_warmup"),
    (lambda p: mk.AdEMAMix(p, alpha_warmup=100, capturable=True), "capturable"),
])
def test_constructor_names_the_bad_hyperparameter(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.randn(3))])


def _model_and_opt(**kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ps = list(model.parameters())
    opt = mk.AdamW([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2, **kw)
    return model, opt


def _backward(model):
    model.zero_grad()
    model(torch.randn(5, 4)).square().sum().backward()


def _unchanged(model, opt, error, match):
    """opt.step() raises error, and no parameter or state moved."""
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert str(state) == str(opt.state_dict())


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("breakage, error, match", [
    (lambda model, opt: opt.param_groups[1].__setitem__("lr", -0.5), ValueError, "lr"),
    (lambda model, opt: opt.param_groups[1].__setitem__("betas", (0.9, 1.2)), ValueError, "beta2"),
    (lambda model, opt: opt.param_groups[1].__setitem__("hvp", "nope"), ValueError, "hvp"),
    (lambda model, opt: setattr(model[1].weight, "grad", model[1].weight.grad.to_sparse()), TypeError, "sparse"),
    # the optimizer's own check (its op calls skip theirs): a param that is its own grad
    (lambda model, opt: setattr(model[1].weight, "grad", model[1].weight.detach()), ValueError,
     "is its own gradient"),
])
def test_failed_step_changes_no_parameter_or_state(first_step, breakage, error, match):
    model, opt = _model_and_opt(memory_correction=-1.0)
    if not first_step:
        for _ in range(3):
            _backward(model)
            opt.step()
    _backward(model)
    breakage(model, opt)
    _unchanged(model, opt, error, match)


def test_probe_without_closure_and_unavailable_backend():
    model, opt = _model_and_opt(memory_correction=1.0, hvp="probe")
    _backward(model)
    _unchanged(model, opt, ValueError, "closure")
    model, opt = _model_and_opt(backend="cuda")
    _backward(model)
    _unchanged(model, opt, backends.BackendUnavailable, "cuda")


def test_exact_hvp_needs_a_graph():
    model, opt = _model_and_opt(memory_correction=1.0, hvp="exact")
    _backward(model)
    _unchanged(model, opt, ValueError, "create_graph")


def test_memory_stats_needs_tracking():
    _, opt = _model_and_opt()
    with pytest.raises(RuntimeError, match="track_memory"):
        opt.memory_stats()


def test_ops_check_again_after_an_optimizer_step():
    """The optimizer's calls skip the op's check (it ran its own); calls after a step, failed or not, do not."""
    model, opt = _model_and_opt()
    _backward(model)
    model[1].weight.grad = model[1].weight.detach()
    with pytest.raises(ValueError, match="is its own gradient"):
        opt.step()
    _backward(model)
    opt.step()
    params, grads, m, v, refs = _adamw_args()
    grads[1] = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        _call(params, grads, m, v, refs)


@pytest.mark.parametrize("make, match", [
    (lambda w, base: [w, w], "parameter 1 is parameter 0 again"),
    (lambda w, base: [torch.nn.Parameter(base[:4]), torch.nn.Parameter(base[2:6])], "parameters 0 and 1 share memory"),
    (lambda w, base: [torch.nn.Parameter(base.view(2, 4).t()), torch.nn.Parameter(base[7:])],
     "parameters 0 and 1 share memory"),
    (lambda w, base: [{"params": [w]}, {"params": [torch.nn.Parameter(base[:2]), torch.nn.Parameter(base[1:3])]}],
     "parameters 1 and 2 share memory"),
], ids=["twice", "overlapping views", "strided view", "across groups"])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_duplicate_or_overlapping_params_are_refused(cls, make, match):
    """torch.optim only warns on a duplicate (and its step then updates it twice); here each is an error."""
    w, base = torch.nn.Parameter(torch.randn(8)), torch.randn(8)
    with warnings.catch_warnings(), pytest.raises(ValueError, match=match):
        warnings.simplefilter("ignore", UserWarning)  # torch's own warning on a duplicate
        cls(make(w, base), lr=1e-3)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_complex_params_are_refused_and_a_refused_group_is_not_added(cls):
    with pytest.raises(TypeError, match=r"shape \(3,\) is torch.complex64; complex parameters are not supported"):
        cls([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], lr=1e-3)
    w = torch.nn.Parameter(torch.randn(4))
    opt = cls([w], lr=1e-3)
    with pytest.raises(ValueError, match="parameters 0 and 1 share memory"):
        opt.add_param_group({"params": [torch.nn.Parameter(w.data[:2])]})
    assert len(opt.param_groups) == 1
    w.grad = torch.ones(4)
    opt.step()  # the optimizer is whole after the refusal


def test_disjoint_views_of_one_buffer_are_accepted():
    base = torch.randn(4, 4)
    opt = mk.AdamW([torch.nn.Parameter(base[:2]), torch.nn.Parameter(base[2:])], lr=1e-3)
    assert len(opt.param_groups[0]["params"]) == 2


def test_a_param_that_is_its_own_grad_is_refused_and_changes_nothing():
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = p.data
    opt = mk.AdamW([p], lr=1e-3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="is its own gradient"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state



def test_an_expanded_param_is_named_as_not_dense():
    p = torch.nn.Parameter(torch.randn(1, 2).expand(4, 2))
    p.grad = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"params\[0\] is not dense \(strides \(0, 1\) for shape \(4, 2\)"):
        mk.AdamW([p], lr=1e-3).step()


@pytest.mark.parametrize("cls, key, value, name", [
    (mk.AdamW, "lr", "1e-3", "lr"), (mk.AdamW, "memory_correction", True, "memory_correction"),
    (mk.AdamW, "memory_correction", "yes", "memory_correction"), (mk.AdamW, "eps", True, "eps"),
    (mk.AdamW, "weight_decay", None, "weight_decay"), (mk.AdamW, "betas", ("0.9", 0.999), "beta1"),
    (mk.Lion, "smoothing", "1e-4", "smoothing"), (mk.Lion, "betas", (0.9, False), "beta2"),
    (mk.SGD, "momentum", True, "momentum"), (mk.SGD, "weight_decay", "0", "weight_decay"),
    (mk.AdEMAMix, "alpha", "5", "alpha"), (mk.AdEMAMix, "betas", (0.9, 0.999, True), "beta3"),
])
def test_bools_and_strings_are_refused_for_numbers_by_name(cls, key, value, name):
    """torch refuses lr="1e-3"; True as memory_correction would silently be +1, the opposite of cancelling."""
    with pytest.raises(TypeError, match=f"{name} must be a real number"):
        cls([torch.nn.Parameter(torch.randn(3))], **{key: value})
    opt = cls([torch.nn.Parameter(torch.randn(3))])  # and set later, at the step: refused, nothing changed
    p = opt.param_groups[0]["params"][0]
    p.grad, before = torch.ones(3), p.detach().clone()
    opt.param_groups[0][key] = value
    with pytest.raises(TypeError, match=f"{name} must be a real number"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state


def test_an_hvp_setting_without_memory_measurement_warns_that_it_is_unused():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.warns(UserWarning, match="hvp='probe', hvp_every=1 is unused"):
        mk.AdamW(p, hvp="probe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mk.AdamW(p, hvp="probe", track_memory=True)
        mk.AdamW(p, hvp="probe", memory_correction=-1.0)
        mk.AdamW(p)
