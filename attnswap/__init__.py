"""attnswap: swap the attention of a pretrained Hugging Face model for another kind, in one line.

    import attnswap
    attnswap.swap_attention(model, "entmax", alpha=1.5)
"""

__version__ = "0.1.0"

from . import kinds  # noqa: F401  (registers the built-in kinds)

try:
    from . import kernels  # noqa: F401  (registers the Triton kernels when triton is importable)
except ImportError:
    pass
from .api import (
    SwapHandle,
    attention,
    available_kinds,
    register_kind,
    restore_attention,
    swap_attention,
    swapped,
)
from .errors import AttnSwapError, UnsupportedModelError
from .patches.interface import register_all as _register_all
from .patches.state_cache import StateCache
from .adapt.calibrate import calibrate
from .adapt.finetune import finetune
from .adapt.saving import load_swap, save_swap
from .adapt.transfer import transfer

_register_all()

__all__ = [
    "AttnSwapError",
    "StateCache",
    "SwapHandle",
    "UnsupportedModelError",
    "attention",
    "available_kinds",
    "calibrate",
    "finetune",
    "load_swap",
    "register_kind",
    "restore_attention",
    "save_swap",
    "swap_attention",
    "swapped",
    "transfer",
]
