"""mk.theory: memoryless approximations of optimizers with memory, and their order of accuracy.

engine: any update rule written through its gradient history (Rule) -> its
memoryless update and correction M (memoryless_terms, correction), stepping
objects for both paths (with_memory, memoryless) and the experiment
(rule_order). rules: the shipped optimizers and examples with no closed form.
"""
from . import rules
from .cost import engine_cost
from .engine import (Memoryless, MemorylessStep, MemoryStep, Rule, RuleOrder, correction, loss_hvp, memoryless,
                     memoryless_terms, rule_order, with_memory)
from .order import OrderResult, order_of_accuracy, trajectory
from .plot import plot_order
from .problems import Problem, logistic, tanh_regression

__all__ = ["OrderResult", "order_of_accuracy", "trajectory", "Problem", "logistic", "tanh_regression",
           "Rule", "Memoryless", "MemoryStep", "MemorylessStep", "RuleOrder", "correction", "loss_hvp",
           "memoryless", "memoryless_terms", "rule_order", "with_memory", "rules", "engine_cost", "plot_order"]
