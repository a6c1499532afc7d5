"""mk.theory: memoryless approximations of optimizers with memory, and their order of accuracy."""
from .order import OrderResult, order_of_accuracy, trajectory
from .problems import Problem, logistic, tanh_regression

__all__ = ["OrderResult", "order_of_accuracy", "trajectory", "Problem", "logistic", "tanh_regression"]
