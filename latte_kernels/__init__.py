"""latte_kernels: fused ops for LaTtE-Flow, importable by any model.

Each op lives in its own module (kernels, launcher, torch.library registration, autograd);
``_backend`` decides which implementation runs; ``reference`` holds the plain-PyTorch ground truth.
Importing this package never needs a GPU, nvcc or a compiler.
"""
from .context_attention import check_ctx_lens, context_attention
from .latte_attention import latte_attention
from .merge import merge_attention_states
from .residual_attention import residual_attention
from .rope import mrope, rope_2d

__all__ = [
    "rope_2d",
    "mrope",
    "merge_attention_states",
    "context_attention",
    "residual_attention",
    "latte_attention",
    "check_ctx_lens",
]
__version__ = "0.1.0"
