"""asteria's optimizers: Shampoo, SOAP, KL-Shampoo and KL-SOAP as `torch.optim.Optimizer` subclasses."""

from asteria.optim.base import BlockOptimizer, RefreshFailureError
from asteria.optim.kl import KLSOAP, KLShampoo
from asteria.optim.shampoo import Shampoo
from asteria.optim.soap import SOAP

__all__ = ["BlockOptimizer", "KLSOAP", "KLShampoo", "RefreshFailureError", "SOAP", "Shampoo"]
