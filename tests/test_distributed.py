"""DDP and FSDP2 (DTensor parameters) on two gloo processes equal one process on the full batch.

Each rank trains on half of every batch. The single-process reference adds the two halves' gradients
and halves the sum, which rounds exactly as the two-rank reduction does, so the parameters agree bit for
bit; the memory diagnostics, summed shard by shard and then all-reduced, agree to summation order.
FSDP2 runs save and restore model and optimizer through torch.distributed.checkpoint in the middle.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import _distributed as workers

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

STEPS = 6


def _assert_same(got: dict, want: dict) -> None:
    for a, b in zip(got["params"], want["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for g, w in zip(got["stats"], want["stats"]):
        assert g["step"] == w["step"] == STEPS
        for key in ("update_norm", "correction_norm", "memory_effect", "penalty", "explained"):
            assert g[key] == pytest.approx(w[key], rel=1e-6), key


@pytest.mark.parametrize("name, correction", [("adamw", 0.0), ("adamw", -0.5), ("sgd", 0.5)])
def test_ddp_matches_single_process(tmp_path, name, correction):
    got = workers.spawn(workers.ddp, tmp_path, name, correction, STEPS)
    _assert_same(got, workers.single_process(name, correction, STEPS))


@pytest.mark.parametrize("name, correction", [("adamw", 0.0), ("adamw", -0.5), ("sgd", 0.5)])
def test_fsdp2_sharded_state_and_checkpoint_round_trip(tmp_path, name, correction):
    got = workers.spawn(workers.fsdp2, tmp_path, name, correction, STEPS, STEPS // 2)
    _assert_same(got, workers.single_process(name, correction, STEPS))
    assert got["steps"] == [float(STEPS)] * 4
    assert got["sharded"], "the optimizer kept no state"
    for key, kind, placements, local, total in got["sharded"]:
        assert kind == "DTensor" and "Shard(dim=0)" in placements, (key, kind, placements)
        assert local < total, f"{key}: rank 0 holds {local} of {total} elements: not sharded"
