"""fxclip: DP-SGD per-sample clipping as a torch.compile graph pass."""
from . import accounting
from .accounting import Accountant, noise_multiplier_for
from .adaptive import AdaptiveClipping
from .inspect_report import Explanation, explain
from .make_private import make_private
from .optim import DPOptimizer
from .passes import PrivacyError
from .privatize import PrivatizedModule, privatize, unprivatize
from .sampling import PoissonDataLoader, micro_batches

__all__ = ["PrivacyError", "PrivatizedModule", "privatize", "unprivatize", "explain", "Explanation", "make_private",
           "DPOptimizer", "Accountant", "noise_multiplier_for", "accounting", "PoissonDataLoader",
           "micro_batches", "AdaptiveClipping"]
__version__ = "0.1.0"
