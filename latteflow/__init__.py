"""latteflow: LaTtE-Flow (layerwise timestep-expert flow transformer) over a Qwen2-VL backbone.

Composes the ops of ``latte_kernels``; never re-implements one. See SPEC section 3.1 for the API.
"""
from latteflow.core.config import LatteFlowConfig
from latteflow.core.context import Context
from latteflow.core.model import LatteFlowModel
from latteflow.apps.pipeline import LatteFlowPipeline, load_pipeline

__all__ = ["LatteFlowConfig", "LatteFlowModel", "Context", "LatteFlowPipeline", "load_pipeline"]
