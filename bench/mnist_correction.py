"""The implicit suite's --full preset narrowed to one question, does memory_correction=-1 train (3 seeds, beta2
0.9-0.999, alpha = -1 only, no sharpness): a fifth of the preset's runs. Usage: python bench/mnist_correction.py OUT"""
import dataclasses
import sys
from pathlib import Path

from memkernels.bench import implicit, report, run

cfg = dataclasses.replace(implicit.ImplicitConfig.preset("full"), seeds=3, beta2s=(0.9, 0.95, 0.99, 0.999),
                          corrected_beta2s=(0.95, 0.99, 0.999), alphas=(-1.0,), lrs=(1e-3,), power_iterations=0)
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
run.run_suite("implicit", cfg, "full, narrowed (see README)", out)
(out / "report.md").write_text(report.render(out))
