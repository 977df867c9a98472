"""Error types (defined in the method contract, `vtprune.contract.errors`; this path is the public one)."""

from .contract.errors import *  # noqa: F403
from .contract.errors import __all__  # noqa: F401
