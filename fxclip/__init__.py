"""fxclip: DP-SGD per-sample gradient clipping as a torch.compile graph pass."""
from .passes import PrivacyError
from .privatize import PrivatizedModule, privatize

__all__ = ["PrivacyError", "PrivatizedModule", "privatize"]
__version__ = "0.1.0"
