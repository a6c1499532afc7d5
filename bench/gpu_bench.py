"""Optimizer-step timings side by side on one GPU, against the copy bandwidth measured in the same run.

Two workloads: one fp32 tensor of --flat-params elements (256M by default) and
the GPT-2-small shape list (148 tensors, 124M). Rows: a device-to-device copy
(the bandwidth ceiling), torch.optim.AdamW fused and foreach, lion-pytorch's
Lion with use_triton=True (GPT-2 list), and every memkernels backend that can
run on CUDA for AdamW, AdamW + trajectory correction + diagnostics, the probe
(its pass plus the step from the kept origins, 48 bytes), a step that reuses a
kept estimate of H d (hvp_every > 1), Lion and heavy ball, called through the
ops with the backend forced; the GPU backends'
AdamW also with the per-step scalars read on the device (step_scalars, the
capturable path) and replayed from a CUDA graph (no host overhead), and the
Triton backend at other tile sizes. Compact states (issue 20's speed targets): AdamW with bf16 m and v
rounded stochastically and to nearest, AdamW + trajectory correction + diagnostics with bf16 states and a bf16
previous gradient, and bf16 params with Kahan compensations, on the Triton and CUDA backends (CUDA refuses
stochastic rounding and bf16 params: those rows show its refusal).

Each row is warmed up, then timed with CUDA events around `inner` calls
(enough for ~20 ms), repeats interleaved across rows; the median per-call time
is reported with GB/s from the byte model of docs/DESIGN.md, the percentage of the
copy bandwidth and the time relative to torch's fused AdamW. Rows of one
workload share one set of params, grads and states (in-place updates keep them
finite), so the GPU holds ~7 GiB per workload (256M fp32) plus torch's own states, and ~3 GiB of bf16 buffers
for the compact-state rows (m, v, a previous gradient, params, grads and compensations: 12 bytes a parameter).

    python bench/gpu_bench.py --out DIR     # writes DIR/gpu_bench.json and DIR/gpu_bench.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from memkernels.reference import NDIAG

# Bytes moved per parameter per step, fp32 (docs/DESIGN.md "Performance model"); copy: read + write.
# adamw_kept: the trajectory's previous gradient kept by the optimizer (a new gradient tensor every step), read only
# adamw_probe: the probe pass (read p g, write origin and p + tau d) and the step after it (read origin g m v g_probe,
# write p m v); adamw_reuse: a step of hvp_every > 1 that reads the kept estimate of H d instead of a gradient
BYTES_PER_PARAM = {"copy": 8, "adamw": 28, "adamw_traj": 36, "adamw_kept": 32, "adamw_probe": 48, "adamw_reuse": 32,
                   "lion": 20, "heavy_ball": 20}
# Compact states (docs/DESIGN.md "Compact states"), bf16 at 2 bytes: adamw_bf16: fp32 p (8) g (4), bf16 m v (8);
# adamw_traj_bf16: + a bf16 previous gradient read and rewritten (2 + 2); adamw_kahan: bf16 p g m v and the Kahan
# compensation, each read and (but g) written
COMPACT_BYTES_PER_PARAM = {"adamw_bf16": 20, "adamw_traj_bf16": 24, "adamw_kahan": 18}
MODELS = {**BYTES_PER_PARAM, **COMPACT_BYTES_PER_PARAM}
GPU_BACKENDS = ("cuda", "triton")
TRITON_TILES = [(1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8)]  # (BLOCK, num_warps) swept on the flat tensor
BASELINE = "torch AdamW fused"


@dataclass
class Row:
    workload: str
    name: str
    model: str  # key of MODELS
    numel: int
    fn: Callable[[], None] | None = None
    skip: str | None = None
    inner: int = 1
    times_ms: list[float] = field(default_factory=list)

    @property
    def ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None


def gbps(model: str, numel: int, ms: float) -> float:
    """Achieved GB/s (1e9 bytes) under the byte model."""
    return MODELS[model] * numel / (ms * 1e-3) / 1e9


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_bench.json and gpu_bench.md")
    parser.add_argument("--flat-params", type=int, default=1 << 28, help="elements of the one-tensor workload")
    parser.add_argument("--workloads", nargs="+", choices=("flat", "gpt2"), default=["flat", "gpt2"])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timings per row (median reported)")
    parser.add_argument("--target-ms", type=float, default=20.0, help="time per timing; sets calls per timing")
    parser.add_argument("--no-sweep", action="store_true", help="skip the Triton tile-size sweep")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a smoke test of this script (host timer; Triton under TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.flat_params <= 0 or args.repeats <= 0 or args.target_ms <= 0:
        parser.error("--flat-params, --repeats and --target-ms must be positive")
    return args


# ------------------------------------------------------------------ report

def summarize(rows: Sequence[Row]) -> list[dict]:
    """Per row: median ms, GB/s, percent of copy bandwidth, time over torch fused AdamW (same workload)."""
    copy = next((r for r in rows if r.model == "copy" and r.ms), None)
    copy_gbps = gbps("copy", copy.numel, copy.ms) if copy else None
    fused = {r.workload: r.ms for r in rows if r.name == BASELINE and r.ms}
    out = []
    for r in rows:
        entry = {"workload": r.workload, "row": r.name, "bytes_per_param": MODELS[r.model],
                 "numel": r.numel, "ms": r.ms, "samples_ms": r.times_ms, "calls_per_sample": r.inner,
                 "gbps": None, "pct_copy": None, "vs_fused": None, "skip": r.skip}
        if r.ms:
            entry["gbps"] = gbps(r.model, r.numel, r.ms)
            if copy_gbps:
                entry["pct_copy"] = 100.0 * entry["gbps"] / copy_gbps
            if r.workload in fused:
                entry["vs_fused"] = r.ms / fused[r.workload]
        out.append(entry)
    return out


def markdown(summary: Sequence[dict]) -> str:
    lines = ["| workload | row | B/param | ms | GB/s | % copy | t / fused |", "|---|---|---:|---:|---:|---:|---:|"]

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    for e in summary:
        if e["ms"] is None:
            why = (e["skip"] or "no data").replace("|", "/")
            lines.append(f"| {e['workload']} | {e['row']} | {e['bytes_per_param']} | {why} | | | |")
        else:
            lines.append(f"| {e['workload']} | {e['row']} | {e['bytes_per_param']} | {e['ms']:.3f} | "
                         f"{fmt(e['gbps'], '.0f')} | {fmt(e['pct_copy'], '.1f')} | {fmt(e['vs_fused'], '.2f')} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ timing

def elapsed_ms(fn: Callable[[], None], calls: int, device: torch.device) -> float:
    """Time of `calls` back-to-back calls: CUDA events on a GPU, the host clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) * 1e3


def _error(exc: Exception) -> str:
    return f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"


def measure(rows: Sequence[Row], repeats: int, target_ms: float, device: torch.device) -> None:
    """Warm up every row, pick calls per timing, then time all rows in interleaved rounds."""
    for row in rows:
        if row.skip:
            continue
        try:
            elapsed_ms(row.fn, 2, device)  # compile, build tables, create optimizer state
            once = elapsed_ms(row.fn, 1, device)
            row.inner = max(1, min(50, round(target_ms / max(once, 1e-3))))
        except Exception as exc:  # reported in the table, never silently dropped
            row.skip = _error(exc)
    for _ in range(repeats):
        for row in rows:
            if not row.skip:
                row.times_ms.append(elapsed_ms(row.fn, row.inner, device) / row.inner)


# ------------------------------------------------------------------ workloads

class Tensors:
    """One workload's params, grads, states and reference gradients (random, never zeros)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], seed: int, device: torch.device) -> None:
        gen = torch.Generator(device).manual_seed(seed)

        def rand(std: float, positive: bool = False) -> list[torch.Tensor]:
            out = [torch.randn(s, generator=gen, device=device) * std for s in shapes]
            return [t.abs_() for t in out] if positive else out

        self.device = device
        self.params, self.grads = rand(1.0), rand(1e-2)
        self.exp_avgs, self.exp_avg_sqs, self.grad_refs = rand(1e-3), rand(1e-4, positive=True), rand(1e-2)
        self.origins, self.hvps = rand(1.0), rand(1e-2)
        self.diagnostics = torch.zeros(NDIAG, dtype=torch.float64, device=device)
        self.probe_norms = torch.zeros(2, dtype=torch.float64, device=device)
        self.tau = torch.full((1,), 1e-4, dtype=torch.float64, device=device)
        self.numel = sum(p.numel() for p in self.params)


class CompactTensors:
    """One workload's bf16 buffers for the compact-state rows, from its fp32 ones: m, v and a previous gradient
    (beside the fp32 params), params and grads with their Kahan compensations (sharing m and v), rounding keys."""

    def __init__(self, t: Tensors, seed: int) -> None:
        from memkernels import _ops
        from memkernels.ops.rounding import tensor_keys

        def bf16(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return [x.to(torch.bfloat16) for x in tensors]

        self.exp_avgs, self.exp_avg_sqs, self.grad_refs = bf16(t.exp_avgs), bf16(t.exp_avg_sqs), bf16(t.grad_refs)
        self.params, self.grads = bf16(t.params), bf16(t.grads)
        self.compensations = [torch.zeros_like(p) for p in self.params]
        n, columns = len(t.params), _ops.KEY_COLUMNS["adamw"]
        self.keys = tensor_keys(seed, 1, torch.arange(n * columns, dtype=torch.int64).view(n, columns)).to(t.device)


ADAMW = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, bias_correction1=1 - 0.9 ** 10,
             bias_correction2=1 - 0.999 ** 10, mean_age1=2.9, mean_age2=4.4)
LION = dict(lr=1e-5, beta1=0.9, beta2=0.99, weight_decay=0.01, smoothing=0.0, ema_weight=0.2, age_weight=0.5)
HEAVY_BALL = dict(lr=1e-4, momentum=0.9, weight_decay=0.0, nesterov=False, update_scale=6.5, memory_coef=30.0)
TRAJECTORY = dict(correction=-1.0, hvp_scale=1e4, update_grad_refs=True)
KEPT = {**TRAJECTORY, "update_grad_refs": False}
PROBE = dict(correction=-1.0, update_grad_refs=False)


def op_rows(workload: str, t: Tensors, backend: str, label: str | None = None) -> list[Row]:
    """AdamW, AdamW + trajectory correction + diagnostics (previous gradient copied, or kept), Lion and heavy ball
    through the ops."""
    ops = torch.ops.memkernels
    label = label or f"memkernels {backend}"
    P, G, M, V, R, D = t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.grad_refs, t.diagnostics
    O, H, N, tau = t.origins, t.hvps, t.probe_norms, t.tau

    def probe_step() -> None:  # what a probe step runs besides the closure: the pass, then the step from origins
        ops.adamw_(P, G, M, V, [], None, backend=backend, **ADAMW, probe=True, origins=O, probe_tau=tau,
                   probe_norms=N)
        ops.adamw_(P, G, M, V, R, D, backend=backend, **ADAMW, **PROBE, origins=O, probe_tau=tau)

    calls = [
        ("AdamW", "adamw", lambda: ops.adamw_(P, G, M, V, [], None, backend=backend, **ADAMW)),
        ("AdamW probe pass+step", "adamw_probe", probe_step),
        ("AdamW+kept H d (hvp_every)", "adamw_reuse",
         lambda: ops.adamw_(P, G, M, V, [], D, backend=backend, **ADAMW, **PROBE, hvps=H, reuse_hvp=True)),
        ("AdamW+traj+diag", "adamw_traj",
         lambda: ops.adamw_(P, G, M, V, R, D, backend=backend, **ADAMW, **TRAJECTORY)),
        ("AdamW+traj+diag kept", "adamw_kept", lambda: ops.adamw_(P, G, M, V, R, D, backend=backend, **ADAMW, **KEPT)),
        ("Lion", "lion", lambda: ops.lion_(P, G, M, [], None, backend=backend, **LION)),
        ("heavy ball", "heavy_ball", lambda: ops.sgd_(P, G, M, [], None, backend=backend, **HEAVY_BALL)),
    ]
    return [Row(workload, f"{label} {name}", model, t.numel, fn) for name, model, fn in calls]


def compact_rows(workload: str, t: Tensors, c: CompactTensors, backend: str) -> list[Row]:
    """AdamW with bf16 states through one backend's ops: rounded stochastically (the optimizers' default) and to
    nearest, with the trajectory correction and diagnostics as the AdamW+traj+diag row (a bf16 previous gradient
    read and rewritten, states rounded stochastically), and on bf16 params with Kahan compensations (states
    rounded stochastically). A row the backend's kernel lacks the capability for shows the op's refusal."""
    from memkernels import backends

    label = f"memkernels {backend}"
    try:
        kernel = backends.resolve("adamw", backend, t.device.type)[1]
    except backends.BackendUnavailable as exc:
        return [Row(workload, f"{label} bf16 states", "adamw_bf16", t.numel, skip=f"skipped: {exc}")]
    ops = torch.ops.memkernels
    P, G, D = t.params, t.grads, t.diagnostics
    M, V, R, K = c.exp_avgs, c.exp_avg_sqs, c.grad_refs, c.keys
    calls = [  # name, byte model, the kernel capabilities it needs, the call
        ("AdamW bf16 states (stochastic)", "adamw_bf16", ("stochastic_rounding",),
         lambda: ops.adamw_(P, G, M, V, [], None, backend=backend, **ADAMW, rounding_keys=K)),
        ("AdamW bf16 states (nearest)", "adamw_bf16", (),
         lambda: ops.adamw_(P, G, M, V, [], None, backend=backend, **ADAMW)),
        ("AdamW+traj bf16 states", "adamw_traj_bf16", ("stochastic_rounding",),
         lambda: ops.adamw_(P, G, M, V, R, D, backend=backend, **ADAMW, **TRAJECTORY, rounding_keys=K)),
        ("AdamW bf16 params + Kahan", "adamw_kahan", ("bf16_params", "stochastic_rounding"),
         lambda: ops.adamw_(c.params, c.grads, M, V, [], None, backend=backend, **ADAMW, rounding_keys=K,
                            compensations=c.compensations)),
    ]
    rows = []
    for name, model, needs, fn in calls:
        row = Row(workload, f"{label} {name}", model, t.numel, fn)
        rows.append(_refused(row) if not all(getattr(kernel, need) for need in needs) else row)
    return rows


def _refused(row: Row) -> Row:
    """The row's call once, to record the op's refusal by name as its skip (a refused step changes nothing)."""
    try:
        row.fn()
    except ValueError as exc:
        row.fn, row.skip = None, f"skipped: {(str(exc).splitlines() or [''])[0]}"
    return row


def step_scalars_rows(workload: str, t: Tensors) -> list[Row]:
    """AdamW rows of the GPU backends with the per-step scalars read on the device (capturable steps)."""
    from memkernels import _ops, backends

    ops = torch.ops.memkernels
    P, G, M, V, R, D = t.params, t.grads, t.exp_avgs, t.exp_avg_sqs, t.grad_refs, t.diagnostics
    values = {**ADAMW, "hvp_scale": TRAJECTORY["hvp_scale"]}
    step = torch.tensor([values[k] for k in _ops.STEP_SCALARS["adamw"]], dtype=torch.float64, device=t.device)
    rows = []
    for name in (b for b in backends.BACKENDS if b in GPU_BACKENDS):
        label = f"memkernels {name} (step_scalars)"
        try:
            backends.resolve("adamw", name, t.device.type)
        except backends.BackendUnavailable as exc:
            rows.append(Row(workload, label, "adamw", t.numel, skip=f"skipped: {exc}"))
            continue
        rows += [
            Row(workload, f"{label} AdamW", "adamw", t.numel,
                lambda b=name: ops.adamw_(P, G, M, V, [], None, backend=b, **ADAMW, step_scalars=step)),
            Row(workload, f"{label} AdamW+traj+diag", "adamw_traj", t.numel,
                lambda b=name: ops.adamw_(P, G, M, V, R, D, backend=b, **ADAMW, **TRAJECTORY, step_scalars=step)),
        ]
    return rows


def backend_rows(workload: str, t: Tensors) -> list[Row]:
    from memkernels import backends

    rows = []
    for name in backends.BACKENDS:
        try:
            backends.resolve("adamw", name, t.device.type)
        except backends.BackendUnavailable as exc:
            rows.append(Row(workload, f"memkernels {name}", "adamw", t.numel, skip=f"skipped: {exc}"))
            continue
        rows += op_rows(workload, t, name)
    return rows


def torch_rows(workload: str, t: Tensors) -> list[Row]:
    rows = []
    for mode in ("fused", "foreach"):
        params = [torch.nn.Parameter(p) for p in t.params]  # shares storage with the workload's params
        for p, g in zip(params, t.grads):
            p.grad = g
        opt = torch.optim.AdamW(params, lr=ADAMW["lr"], weight_decay=ADAMW["weight_decay"], **{mode: True})
        rows.append(Row(workload, f"torch AdamW {mode}", "adamw", t.numel, opt.step))
    return rows


def lion_pytorch_row(workload: str, t: Tensors) -> Row:
    try:
        from lion_pytorch import Lion
    except ImportError as exc:
        return Row(workload, "lion-pytorch Lion triton", "lion", t.numel, skip=f"not installed ({exc})")
    params = [torch.nn.Parameter(p) for p in t.params]
    for p, g in zip(params, t.grads):
        p.grad = g
    try:
        opt = Lion(params, lr=LION["lr"], weight_decay=LION["weight_decay"], use_triton=True)
    except Exception as exc:  # e.g. its triton kernels cannot load
        return Row(workload, "lion-pytorch Lion triton", "lion", t.numel, skip=_error(exc))
    return Row(workload, "lion-pytorch Lion triton", "lion", t.numel, opt.step)


def triton_tile_rows(workload: str, t: Tensors) -> list[Row]:
    """The Triton backend's AdamW rows at other (BLOCK, num_warps) than its default."""
    try:
        from memkernels.backends.triton import host
    except Exception as exc:  # triton missing or broken: the backend rows already say why
        return [Row(workload, "triton tile sweep", "adamw", t.numel, skip=f"skipped: {exc}")]
    rows = []
    for block, warps in TRITON_TILES:
        if (block, warps) == (host.BLOCK, host.NUM_WARPS):
            continue
        for row in op_rows(workload, t, "triton", f"triton B{block}/w{warps}")[:2]:
            row.fn = _with_tile(host, block, warps, row.fn)
            rows.append(row)
    return rows


def _with_tile(module, block: int, warps: int, fn: Callable[[], None]) -> Callable[[], None]:
    def call() -> None:
        saved = module.BLOCK, module.NUM_WARPS
        module.BLOCK, module.NUM_WARPS = block, warps
        try:
            fn()
        finally:
            module.BLOCK, module.NUM_WARPS = saved
    return call


def graph_rows(workload: str, t: Tensors, backend: str) -> list[Row]:
    """A backend's AdamW rows replayed from a CUDA graph: kernel time without Python overhead."""
    rows = op_rows(workload, t, backend, f"{backend} (CUDA graph)")[:2]
    for row in rows:
        try:
            row.fn = _captured(row.fn) if t.device.type == "cuda" else None
            row.skip = None if row.fn else "skipped: CUDA graphs need a GPU"
        except Exception as exc:
            row.skip = _error(exc)
    return rows


def _captured(fn: Callable[[], None]) -> Callable[[], None]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and cache the pointer tables outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_row(workload: str, numel: int, device: torch.device) -> Row:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return Row(workload, "device copy (copy_)", "copy", numel, lambda: dst.copy_(src))


def run_workload(name: str, shapes: list[tuple[int, ...]], args: argparse.Namespace) -> list[Row]:
    from memkernels import backends

    device = torch.device(args.device)
    t = Tensors(shapes, seed=len(name), device=device)
    rows: list[Row] = [copy_row(name, t.numel, device)] if name == "flat" else []
    rows += torch_rows(name, t)
    if name == "gpt2":
        rows.append(lion_pytorch_row(name, t))
    rows += backend_rows(name, t)
    compact = CompactTensors(t, seed=len(name))
    for backend in (b for b in backends.BACKENDS if b in GPU_BACKENDS):
        rows += compact_rows(name, t, compact, backend)
    rows += step_scalars_rows(name, t)
    for backend in ("triton", "cuda"):
        if any(r.name.startswith(f"memkernels {backend} ") for r in rows if not r.skip):
            if backend == "triton" and name == "flat" and not args.no_sweep:
                rows += triton_tile_rows(name, t)
            rows += graph_rows(name, t, backend)
    measure(rows, args.repeats, args.target_ms, device)
    for row in rows:
        row.fn = None  # drop the closures (buffers, optimizer states, graphs) before the next workload
    del t, compact
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return rows


def environment() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2 ** 30)
    from memkernels import backends
    info["backends"] = backends.status()
    return info


def write_report(args: argparse.Namespace, rows: Sequence[Row], started: float) -> str:
    """gpu_bench.json and gpu_bench.md under --out (rewritten after each workload); returns the table."""
    summary = summarize(rows)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device == "cuda" else None
    report = {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()},
              "bytes_per_param": MODELS, "rows": summary, "seconds": time.perf_counter() - started,
              "max_memory_allocated_gib": peak}
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=1))
    table = markdown(summary)
    (args.out / "gpu_bench.md").write_text(table)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; nothing to measure (--device cpu runs a smoke test)", file=sys.stderr)
        return 2
    import memkernels  # noqa: F401  (registers the ops)
    from memkernels.bench.shapes import gpt2_small

    args.out.mkdir(parents=True, exist_ok=True)
    workloads = {"flat": [(args.flat_params,)], "gpt2": gpt2_small()}
    started = time.perf_counter()
    rows: list[Row] = []
    for name in args.workloads:
        rows += run_workload(name, workloads[name], args)
        table = write_report(args, rows, started)  # what is done survives a timeout later on
        print(f"gpu_bench: {name} done at {time.perf_counter() - started:.0f} s", flush=True)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
