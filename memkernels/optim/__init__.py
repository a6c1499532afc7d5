"""Drop-in torch.optim optimizers over the fused ops."""
from .adamw import AdamW
from .lion import Lion
from .sgd import SGD

__all__ = ["AdamW", "Lion", "SGD"]
