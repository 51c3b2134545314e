"""The torch runtime of dualpipe: run any dualpipe schedule with real ``nn.Module`` stages.

A program written for the reference DualPipe changes its imports and its constructor::

    from dualpipe_rs.torch import Pipeline, WeightGradStore, run_backward
    pipe = Pipeline(dualpipe_rs.plan("dualpipev", ranks, chunks), (stage_a, stage_b))
    loss, outputs = pipe.step(x, num_chunks=chunks, criterion=criterion, labels=(y,))

See docs/torch.md.
"""

from ._comm import set_p2p_tensor_dtype, set_p2p_tensor_shapes
from ._gloo import gloo_loop_threads, set_gloo_loop_policy
from ._models import CausalLMStage, measure_layer_costs, model_units, parameter_costs, split_model
from ._pipeline import Pipeline, PipelineError
from ._profile import Profile
from ._split import DeferredWeights, backward_input
from ._store import WeightGradStore, run_backward

__all__ = [
    "Pipeline",
    "PipelineError",
    "Profile",
    "WeightGradStore",
    "run_backward",
    "set_p2p_tensor_shapes",
    "set_p2p_tensor_dtype",
    "backward_input",
    "DeferredWeights",
    "split_model",
    "measure_layer_costs",
    "parameter_costs",
    "model_units",
    "CausalLMStage",
    "set_gloo_loop_policy",
    "gloo_loop_threads",
]
