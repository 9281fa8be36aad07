"""Reference models that call hierkern's ops, each with impl="reference" (eager baseline) or
impl="kernels"."""
from .hmar import HMAR
from .var import VAR

__all__ = ["VAR", "HMAR"]
