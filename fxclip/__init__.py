"""fxclip: DP-SGD per-sample clipping as a torch.compile graph pass."""
from .passes import PrivacyError
from .privatize import PrivatizedModule, privatize
from .inspect_report import Explanation, explain

__all__ = ["PrivacyError", "PrivatizedModule", "privatize", "explain", "Explanation"]
__version__ = "0.1.0"
