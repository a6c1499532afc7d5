"""Each script in examples/ runs as a user runs it, at a tiny size, and its training lowers the loss.

Every example prints `loss <first> -> <last>` (per run); the Trainer example's checkpoints are compared
here, outside the script: resuming from the halfway checkpoint must end where the uninterrupted run ended.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LOSS = re.compile(r"^loss (\S+) -> (\S+)$", re.MULTILINE)


def run_example(script: str, *args: str) -> tuple[list[tuple[float, float]], str]:
    """The script's (first, last) loss pairs and its stdout; the repo's memkernels first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    pairs = [(float(a), float(b)) for a, b in LOSS.findall(proc.stdout)]
    assert pairs, f"{script} printed no `loss <first> -> <last>` line:\n{proc.stdout[-2000:]}"
    return pairs, proc.stdout


def assert_trained(pairs: list[tuple[float, float]]) -> None:
    for first, last in pairs:
        assert first == first and last == last, pairs  # not NaN
        assert last < first, pairs


def test_char_lm_tiny():
    pairs, _ = run_example("char_lm.py", "--tiny", "--alpha", "0", "-1")
    assert len(pairs) == 2  # one per alpha
    assert_trained(pairs)


def test_mnist_mlp_with_the_probe():
    pairs, out = run_example("mnist_mlp.py", "--epochs", "1", "--hidden", "32", "--train-size", "1000")
    assert_trained(pairs)
    assert "memory_stats:" in out


def test_lightning_module_steps_with_lightnings_closure():
    pytest.importorskip("lightning")
    pairs, out = run_example("lightning_module.py", "--steps", "30", "--hidden", "16")
    assert_trained(pairs)
    # Lightning's closure ran twice per optimizer step: the probe re-evaluated it at the shifted point
    assert re.search(r"training_step calls per step: 2$", out, re.MULTILINE), out


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in _tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


def test_hf_trainer_resume_restores_the_optimizer(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    steps = 20
    pairs, _ = run_example("hf_trainer.py", "--output-dir", str(tmp_path), "--steps", str(steps), "--width", "32",
                           "--batch", "8", "--context", "32")
    assert_trained(pairs)

    def checkpoint(run: str, step: int) -> tuple[dict, dict]:
        folder = tmp_path / run / f"checkpoint-{step}"
        return load_file(folder / "model.safetensors"), torch.load(folder / "optimizer.pt", weights_only=True)

    (weights, opt_state), (resumed_weights, resumed_opt_state) = checkpoint("run", steps), checkpoint("resumed", steps)
    halfway_weights, _ = checkpoint("run", steps // 2)
    assert weights.keys() == resumed_weights.keys()
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    assert not all(torch.equal(weights[k], halfway_weights[k]) for k in weights)  # the second half trained
    assert opt_state["param_groups"] == resumed_opt_state["param_groups"]
    assert opt_state["state"].keys() == resumed_opt_state["state"].keys()
    for a, b in zip(_tensors(opt_state["state"]), _tensors(resumed_opt_state["state"]), strict=True):
        assert torch.equal(a, b)
    assert all(int(s["step"]) == steps for s in resumed_opt_state["state"].values())


@pytest.mark.gpu
def test_compile_cuda_graphs():
    pairs, _ = run_example("compile_cuda_graphs.py", "--steps", "60", "--hidden", "64")
    assert_trained(pairs)
