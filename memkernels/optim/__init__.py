"""Drop-in torch.optim optimizers over the fused ops."""
from .ademamix import AdEMAMix
from .adamw import AdamW
from .lion import Lion
from .sgd import SGD

__all__ = ["AdEMAMix", "AdamW", "Lion", "SGD"]
