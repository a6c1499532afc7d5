"""Workers for test_distributed.py: 2-process gloo runs on the CPU (spawned, so they import this module)."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import memkernels as mk

BATCH = 64


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def optimizer(name: str, params, correction: float) -> torch.optim.Optimizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trajectory-HVP note
        if name == "sgd":
            return mk.SGD(params, lr=1e-2, momentum=0.9, memory_correction=correction, track_memory=True)
        return mk.AdamW(params, lr=1e-2, memory_correction=correction, track_memory=True)


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's batch, or this rank's equal share of it."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 3, generator=g)
    return x[rank::world], y[rank::world]


def train(net: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    for n in steps:
        x, y = batch(n, rank, world)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()


def single_process(name: str, correction: float, steps: int, world: int = 2) -> dict:
    """The same training in one process: each step's gradient is the mean of the ranks' shares' gradients,
    summed and halved as the data-parallel reduction does (exact for two ranks), so it is bit-comparable."""
    net = model()
    opt = optimizer(name, net.parameters(), correction)
    for n in range(steps):
        for rank in range(world):
            x, y = batch(n, rank, world)
            torch.nn.functional.mse_loss(net(x), y).backward()
        for p in net.parameters():
            p.grad.div_(world)
        opt.step()
        opt.zero_grad()
    return {"params": [p.detach().clone() for p in net.parameters()], "stats": opt.memory_stats()}


def spawn(fn: Callable, folder: Path, *args) -> dict:
    """Run fn(rank, world, folder, *args) on two gloo ranks; rank 0 saves its result to folder/result.pt."""
    mp.spawn(_entry, args=(fn, 2, str(folder), args), nprocs=2, join=True)
    return torch.load(folder / "result.pt")


def _entry(rank: int, fn: Callable, world: int, folder: str, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        result = fn(rank, world, Path(folder), *args)
        if rank == 0:
            torch.save(result, Path(folder) / "result.pt")
    finally:
        dist.destroy_process_group()
    # A rank that succeeded skips the interpreter's teardown: a gloo worker thread may still be dropping a
    # finished all-gather (tensors: it takes the GIL) while Python finalizes, and Python ends such a thread
    # through C++ frames that may not unwind: std::terminate, SIGABRT (seen in about one run in ten of the
    # FSDP2 test; the core's stack: ProcessGroupGloo::runLoop -> ~AsyncAllgatherCoalescedWork ->
    # decref_pyobject -> take_gil -> PyThread_exit_thread).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def ddp(rank: int, world: int, folder: Path, name: str, correction: float, steps: int) -> dict:
    net = DistributedDataParallel(model())
    opt = optimizer(name, net.parameters(), correction)
    train(net, opt, range(steps), rank, world)
    return {"params": [p.detach().clone() for p in net.module.parameters()], "stats": opt.memory_stats()}


def _sharded(mesh) -> torch.nn.Module:
    net = model()
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def fsdp2(rank: int, world: int, folder: Path, name: str, correction: float, steps: int, save_at: int) -> dict:
    """FSDP2 on a CPU mesh: train, save model and optimizer with torch.distributed.checkpoint, restore into
    a fresh model and optimizer, train on."""
    mesh = init_device_mesh("cpu", (world,))
    net = _sharded(mesh)
    opt = optimizer(name, net.parameters(), correction)
    train(net, opt, range(save_at), rank, world)
    model_state, optim_state = get_state_dict(net, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder / "checkpoint")

    net = _sharded(mesh)
    opt = optimizer(name, net.parameters(), correction)
    model_state, optim_state = get_state_dict(net, opt)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=folder / "checkpoint")
    set_state_dict(net, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(net, opt, range(save_at, steps), rank, world)

    sharded = []
    for p in net.parameters():
        state = opt.state[p]
        for key, value in state.items():
            if key != "step":
                local = value.to_local()
                sharded.append((key, type(value).__name__, str(value.placements), local.numel(), value.numel()))
    return {"params": [p.full_tensor() for p in net.parameters()], "stats": opt.memory_stats(),
            "sharded": sharded, "steps": [opt.state[p]["step"].item() for p in net.parameters()]}
