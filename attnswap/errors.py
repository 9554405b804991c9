"""Errors raised by attnswap. Every message names the problem and the valid choices."""


class AttnSwapError(ValueError):
    """Bad input to attnswap: an unknown kind, an invalid option, a mask that cannot be honored, ..."""


class UnsupportedModelError(AttnSwapError):
    """The model has no attention attnswap knows how to swap."""
