"""latteflow: LaTtE-Flow (layerwise timestep-expert flow transformer) over a Qwen2-VL backbone.

Composes the ops of ``latte_kernels``; never re-implements one. See SPEC section 3.1 for the API.
"""
from .config import LatteFlowConfig
from .context import Context
from .model import LatteFlowModel

__all__ = ["LatteFlowConfig", "LatteFlowModel", "Context"]
