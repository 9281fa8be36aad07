"""Reference models that call hierkern's ops, each with impl="reference" (eager baseline) or
impl="kernels"."""
from .acdit import ACDiT
from .axial_transformer import AxialTransformer
from .block_diffusion import BlockDiffusionLM
from .hmar import HMAR
from .masked_diffusion import MaskedDiffusionLM
from .mvar import MVAR
from .var import VAR

__all__ = ["VAR", "HMAR", "MVAR", "ACDiT", "AxialTransformer", "BlockDiffusionLM", "MaskedDiffusionLM"]
