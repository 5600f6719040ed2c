"""latteflow: LaTtE-Flow (layerwise timestep-expert flow transformer) over a Qwen2-VL backbone.

Composes the ops of ``latte_kernels``; never re-implements one. See SPEC section 3.1 for the API.

The map, bottom to top; each floor imports only from itself and the floors below it (never from a
sibling on its own floor), ``latte_kernels`` only through its public names, and never ``benchmarks``
(tests/model/test_import_graph.py checks it):

    core/           config, layers, context, model, sampler, checkpoint, files: the model itself
                    (imports torch, transformers, numpy, safetensors, tqdm and latte_kernels only)
    distributed.py  process groups, seeds per sample, the torchrun main skeleton (torch only; floor of core)
    text/           the character tokenizer and the Qwen2-VL backbones (imports core)
    data/           digits, latent spaces (pixel AE, DC-AE), image grids (imports core)
    pipeline.py     load_pipeline / LatteFlowPipeline: a checkpoint with its tokenizer and latent space,
                    prompts in, images out (imports core, text, data)
    training/       the training loop and its DDP / FSDP2 form (imports core, distributed, text, data)
    evaluation/     classifier scores, FID, distributed sampling, s/img measurement (imports all above)
    apps/           the command line, the digits recipe, experiments, bench (imports all above)
"""
from latteflow.core.config import LatteFlowConfig
from latteflow.core.context import Context
from latteflow.core.model import LatteFlowModel
from latteflow.pipeline import LatteFlowPipeline, load_pipeline

__all__ = ["LatteFlowConfig", "LatteFlowModel", "Context", "LatteFlowPipeline", "load_pipeline"]
