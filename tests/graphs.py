"""Graph helpers shared by the pass tests."""
import torch.fx as fx


def call_targets(gm: fx.GraphModule) -> list:
    """Each call in order: the function for call_function, the module type name for call_module."""
    return [n.target if n.op == "call_function" else type(gm.get_submodule(n.target)).__name__
            for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
