"""Pattern: attention — ``softmax(matmul(q, k^T) [* / scale] [+ mask]) @ v`` — layer norms and embeddings.
Rewrite: none; the matched nodes are marked float (``keep_float``) with the reason int8 would
harm each one, and the float-island pass keeps them float.

Why: a static int8 value has one range for the whole tensor. The additive attention mask
puts -1e4 (or -inf) next to scores of size ~10, so after ``scores + mask`` the scores get
~40 of the 256 levels, and softmax, exponential in its input, turns that rounding into
wrong weights; the scores matmul feeds it directly. The probabilities after softmax span
1e-4..1, and a uint8 range over them rounds most of them to 0. LayerNorm's input is the
residual stream, whose few outlier channels stretch a per-tensor range until the other
channels get a handful of levels. The issue that asked for this measured mean cosine 0.20
for a statically quantized BERT-style encoder.

Used in ``mode="auto"`` only; ``static`` keeps fxq's plain behaviour.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxq.passes.base import PassResult, float_reason, get_module, keep_float

NAME = "protect_attention"
MAX_SCORE_CHAIN = 8
SOFTMAX_REASON = "attention softmax: exponential in its input, so int8 rounding of the scores becomes wrong weights"
SCORE_REASON = "attention scores (softmax input): one int8 range cannot hold both the scores and the mask"
MASK_REASON = "attention-mask add: the -1e4/-inf mask would stretch the scores' int8 range until they lose their levels"
WEIGHTED_SUM_REASON = "attention-weighted sum: a uint8 range over the probabilities rounds most of them to 0"
NORM_REASON = "layer norm: its input (the residual stream) has outlier channels a per-tensor int8 range cannot hold"
EMBEDDING_REASON = ("embedding lookup: a table read, no arithmetic to speed up; its sum with the position "
                    "embeddings feeds a layer norm, which would see one calibrated int8 range")

_SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax}
_MATMUL_FUNCTIONS = {torch.matmul, torch.bmm, operator.matmul, torch.einsum}
_MATMUL_METHODS = {"matmul", "bmm"}
#: Ops between the scores matmul and the softmax: scaling, masking, dtype changes.
_SCORE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                    torch.div, torch.masked_fill, torch.where, F.dropout}
_SCORE_METHODS = {"add", "sub", "mul", "div", "masked_fill", "float", "to", "type_as"}
_ADDITIVE = {operator.add, operator.sub, torch.add, torch.sub, torch.masked_fill, torch.where, "add", "sub",
             "masked_fill"}


def _is_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS)
            or (node.op == "call_method" and node.target == "softmax")
            or isinstance(get_module(gm, node), nn.Softmax))


def _is_matmul(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _MATMUL_FUNCTIONS)
            or (node.op == "call_method" and node.target in _MATMUL_METHODS))


def _is_score_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _SCORE_FUNCTIONS)
            or (node.op == "call_method" and node.target in _SCORE_METHODS)
            or isinstance(get_module(gm, node), nn.Dropout))


def _is_layer_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is F.layer_norm) or isinstance(get_module(gm, node), nn.LayerNorm)


def _score_chain(gm: fx.GraphModule, softmax: fx.Node) -> dict[fx.Node, str]:
    """The nodes from the scores matmul up to ``softmax``'s input, with their reasons."""
    chain: dict[fx.Node, str] = {}
    node = softmax.args[0] if softmax.args else None
    for _ in range(MAX_SCORE_CHAIN):
        if not isinstance(node, fx.Node):
            break
        if _is_matmul(node):
            chain[node] = SCORE_REASON
            break
        if not _is_score_op(gm, node):
            break
        chain[node] = MASK_REASON if node.target in _ADDITIVE else SCORE_REASON
        inputs = node.all_input_nodes
        # Follow the operand that leads to the matmul: the other one is the mask or a scale.
        node = next((a for a in inputs if _is_matmul(a) or _is_score_op(gm, a)), inputs[0] if inputs else None)
    return chain


def _weighted_sum(gm: fx.GraphModule, softmax: fx.Node) -> list[fx.Node]:
    """``probs @ v`` after ``softmax``, and the dropout or dtype casts in between."""
    found, frontier = [], list(softmax.users)
    while frontier and len(found) < MAX_SCORE_CHAIN:
        user = frontier.pop()
        if _is_matmul(user):
            found.append(user)
        elif _is_score_op(gm, user) and len(user.all_input_nodes) == 1:
            found.append(user)
            frontier.extend(user.users)
    return found


def _attention_nodes(gm: fx.GraphModule) -> dict[fx.Node, str]:
    found: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if _is_softmax(gm, node):
            found[node] = SOFTMAX_REASON
            found.update({n: r for n, r in _score_chain(gm, node).items() if n not in found})
            found.update({n: WEIGHTED_SUM_REASON for n in _weighted_sum(gm, node) if n not in found})
        elif _is_layer_norm(gm, node):
            found[node] = NORM_REASON
        elif isinstance(get_module(gm, node), (nn.Embedding, nn.EmbeddingBag)):
            found[node] = EMBEDDING_REASON
    return found


def protect_attention(gm: fx.GraphModule) -> PassResult:
    """Mark attention scores, mask adds, softmax, the weighted sum and layer norms float.

    Example::

        result = protect_attention(torch.fx.symbolic_trace(encoder_layer))
        print(result.changes)  # ["softmax: attention softmax: ...", "add: attention-mask add: ...", ...]
    """
    decided = {node: reason for node, reason in _attention_nodes(gm).items() if float_reason(node) is None}
    changes = []
    for node, reason in decided.items():
        keep_float(node, reason)
        changes.append(f"{node.name}: {reason}")
    # Marks only: nothing to lint or recompile, but the pass did change what will run float.
    return PassResult(gm, bool(changes), changes)
