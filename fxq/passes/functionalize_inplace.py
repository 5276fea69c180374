"""Rewrite in-place ops to out-of-place ones so that quantization cannot drop a mutation.

torch.fx records ``z.mul_(2)`` as a node, but later readers of ``z`` keep pointing at the
pre-mutation node. Once quantization copies ``z`` (quantize/dequantize), the mutation is
lost without a word. This pass replaces every in-place op whose effect it can prove local
with its out-of-place twin and points every later reader of the mutated tensor at the new
node. A mutation it cannot prove local (of a graph input, a module attribute, a view read
later, or the output of an op whose aliasing is unknown) stays as written, and everything
sharing storage with it is kept in float, so no quantize/dequantize copy hides it.
"""
from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxq.passes.base import (
    PassResult, add_submodule_unique, finish, fxq_meta, get_module, keep_float,
)

_PASS_NAME = "functionalize_inplace"
_Order = dict[fx.Node, int]     # position in the graph before the rewrite; new nodes take the old
_ArgsRewrite = Callable[[tuple, dict], "tuple[tuple, dict]"]

_INPLACE_OPERATORS = {  # operator.iadd -> operator.add, operator.iand -> operator.and_, ...
    getattr(operator, "i" + name.rstrip("_")): getattr(operator, name)
    for name in "add sub mul truediv floordiv mod pow and_ or_ xor lshift rshift matmul".split()
}
# Names ending in "_" that return their input without touching its values: plain aliases.
_ALIAS_NOOP_NAMES = frozenset("requires_grad_ share_memory_".split())
# In-place ops without an out-of-place twin of the same meaning (storage surgery, copies,
# random fills; ``bernoulli`` exists but means otherwise): they stay in place, in float.
_NO_TWIN_NAMES = frozenset("""copy_ set_ resize_ resize_as_ uniform_ normal_ random_
    bernoulli_ exponential_ geometric_ cauchy_ log_normal_""".split())
# Ops (methods, or torch / F functions by name) whose output may share storage with an input.
_VIEW_NAMES = _ALIAS_NOOP_NAMES | frozenset("""view reshape flatten unflatten transpose permute
    t squeeze unsqueeze expand expand_as view_as reshape_as narrow select __getitem__ split
    split_with_sizes tensor_split chunk unbind contiguous detach to type type_as float double
    half bfloat16 int long short bool cpu cuda as_strided diagonal movedim moveaxis swapaxes
    swapdims real imag view_as_real view_as_complex unfold ravel rename broadcast_to atleast_1d
    atleast_2d atleast_3d dropout dropout1d dropout2d dropout3d alpha_dropout
    feature_alpha_dropout feature_dropout""".split())
# Ops known to allocate their output, besides every X whose in-place twin X_ exists on Tensor.
_FRESH_NAMES = frozenset("""conv1d conv2d conv3d conv_transpose1d conv_transpose2d
    conv_transpose3d linear bilinear matmul mm bmm einsum cat concat concatenate stack sum mean
    amax amin max min prod var std norm softmax log_softmax clone where zeros_like ones_like
    full_like empty_like rand_like randn_like zeros ones full arange flip roll repeat tile
    gather index_select maximum minimum interpolate pad layer_norm batch_norm group_norm
    instance_norm embedding gelu topk sort argmax argmin cumsum outer square""".split())
# torch.nn.functional allocates its outputs, except these (identity for some arguments).
_F_MAY_ALIAS = frozenset(
    "pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle".split())
_METADATA_METHODS = frozenset("""size dim ndimension numel nelement stride element_size
    get_device is_contiguous is_floating_point is_complex storage_offset data_ptr""".split())
_METADATA_ATTRIBUTES = frozenset("shape dtype device ndim layout is_cuda requires_grad".split())
_VIEW_FUNCTIONS = frozenset({operator.getitem, getattr})
_FRESH_OPERATORS = frozenset(_INPLACE_OPERATORS.values()) | {
    operator.neg, operator.pos, operator.abs, operator.invert, operator.eq, operator.ne,
    operator.lt, operator.le, operator.gt, operator.ge,
}
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)
_FRESH_MODULES = (
    nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.modules.batchnorm._NormBase,
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample, nn.Embedding, nn.EmbeddingBag,
)


class _Replacement(NamedTuple):
    op: str
    target: Any
    label: str
    # Maps the mutation's args/kwargs *at rewrite time* (earlier rewrites may have rewired
    # them) to the replacement's; None keeps them as they are.
    rewrite_args: Optional[_ArgsRewrite] = None


@dataclass(frozen=True)
class _Mutation:
    node: fx.Node
    mutated: fx.Node                        # the value the op writes into
    label: str                              # e.g. "mul_", "relu(inplace=True)"
    replacement: Optional[_Replacement]     # None: no out-of-place form, stays in place
    on_tensor: bool                         # False: ``operator.iadd`` on a python number


# ---------------------------------------------------------------- what an op does to storage

def _torch_name(fn: Any) -> tuple[Optional[str], Any]:
    """The public name of ``fn`` and the namespace (torch, F, torch.Tensor) that exports it."""
    name = getattr(fn, "__name__", None)
    for namespace in (torch, F, torch.Tensor):
        if name and getattr(namespace, name, None) is fn:
            return name, namespace
    return None, None


def _reads_only_metadata(node: fx.Node) -> bool:
    """Shape/dtype queries: a value mutation cannot change what they return."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return (node.op == "call_function" and node.target is getattr and len(node.args) > 1
            and node.args[1] in _METADATA_ATTRIBUTES)


def _may_hold_tensor(node: fx.Node) -> bool:
    """False only when ShapeProp saw a non-tensor (python int, torch.Size) or it is a query."""
    if _reads_only_metadata(node):
        return False
    if "type" in node.meta or "tensor_meta" in node.meta:
        return "tensor_meta" in node.meta
    return True


def _is_torch_nn(module: Optional[nn.Module]) -> bool:
    return module is not None and type(module).__module__.startswith("torch.nn.modules.")


def _module_effect(module: Optional[nn.Module]) -> str:
    if not _is_torch_nn(module):
        return "unknown"                    # user leaf modules may return a buffer or an input
    if isinstance(module, _ALIAS_MODULES):
        return "alias"
    if isinstance(module, _FRESH_MODULES) or type(module).__module__.endswith(".activation"):
        return "fresh"                      # activations here have inplace=False
    return "unknown"


def _name_effect(name: Optional[str], namespace: Any) -> str:
    if name is None:
        return "unknown"
    if name in _VIEW_NAMES:
        return "alias"
    if namespace is F and name not in _F_MAY_ALIAS:
        return "fresh"
    if name in _FRESH_NAMES or callable(getattr(torch.Tensor, name + "_", None)):
        return "fresh"
    return "unknown"


def _storage_effect(gm: fx.GraphModule, node: fx.Node) -> str:
    """"fresh" (allocates), "alias" (may return a view of an input), "source" or "unknown"."""
    if node.op in ("placeholder", "get_attr"):
        return "source"
    if node.op == "call_module":
        return _module_effect(get_module(gm, node))
    if node.op == "call_method":
        return _name_effect(node.target, torch.Tensor)
    if node.target in _VIEW_FUNCTIONS:
        return "alias"
    if node.target in _FRESH_OPERATORS:
        return "fresh"
    return _name_effect(*_torch_name(node.target))


# ---------------------------------------------------------------- finding in-place ops

def _first_input(node: fx.Node) -> Optional[fx.Node]:
    value = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return value if isinstance(value, fx.Node) else None


def _is_inplace_name(name: Any) -> bool:
    """``add_``, ``relu_``: public names ending in one underscore (not ``__iadd__``)."""
    return (isinstance(name, str) and name.endswith("_") and not name.startswith("_")
            and name not in _ALIAS_NOOP_NAMES)


def _special_replacement(name: str, node: fx.Node) -> Optional[_Replacement]:
    """Twin-less fills; ``fill_`` with a tensor value stays in place (None)."""
    rest = node.args[1:]
    if node.kwargs:
        return None
    if name == "zero_" and not rest:
        return _Replacement("call_function", torch.zeros_like, "zeros_like")
    if name == "fill_" and len(rest) == 1 and isinstance(rest[0], (bool, int, float)):
        return _Replacement("call_function", torch.full_like, "full_like")
    return None


def _named_inplace(node: fx.Node, name: str, namespace: Any) -> Optional[_Replacement]:
    """The out-of-place form of ``X_`` (method or torch/F function), None when it has none."""
    if name in ("zero_", "fill_"):
        return _special_replacement(name, node)
    twin = getattr(namespace, name[:-1], None)
    if name in _NO_TWIN_NAMES or not callable(twin):
        return None
    if node.op == "call_method":
        return _Replacement("call_method", name[:-1], name[:-1])
    return _Replacement("call_function", twin, name[:-1])


def _inplace_flag_cleared(node: fx.Node) -> Optional[_ArgsRewrite]:
    """For a torch function called with ``inplace=True``: how to call it with inplace=False."""
    fn = node.target
    if not getattr(fn, "__module__", "").startswith("torch"):
        return None
    try:
        signature = inspect.signature(fn)
        bound = signature.bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):     # C builtins without a signature, or a foreign call
        return None
    if bound.arguments.get("inplace") is not True:
        return None
    position = list(signature.parameters).index("inplace")
    if position < len(node.args):
        return lambda args, kwargs: (args[:position] + (False,) + args[position + 1:], kwargs)
    return lambda args, kwargs: (args, {**kwargs, "inplace": False})


def _function_mutation(node: fx.Node) -> Optional[tuple[str, Optional[_Replacement]]]:
    fn = node.target
    if fn in _INPLACE_OPERATORS:
        twin = _INPLACE_OPERATORS[fn]
        return fn.__name__, _Replacement("call_function", twin, twin.__name__)
    name, namespace = _torch_name(fn)
    if _is_inplace_name(name):
        return name, _named_inplace(node, name, namespace)
    cleared = _inplace_flag_cleared(node)
    if cleared is None:
        return None
    label = getattr(fn, "__name__", str(fn))
    replacement = _Replacement("call_function", fn, f"{label}(inplace=False)", cleared)
    return f"{label}(inplace=True)", replacement


def _module_mutation(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[str, _Replacement]]:
    module = get_module(gm, node)
    if not (_is_torch_nn(module) and getattr(module, "inplace", None) is True):
        return None
    kind = type(module).__name__
    return (f"{kind}(inplace=True) {node.target}",
            _Replacement("call_module", node.target, f"{kind}(inplace=False)"))


def _find_mutation(gm: fx.GraphModule, node: fx.Node) -> Optional[_Mutation]:
    found = None
    if node.op == "call_method" and _is_inplace_name(node.target):
        found = node.target, _named_inplace(node, node.target, torch.Tensor)
    elif node.op == "call_function":
        found = _function_mutation(node)
    elif node.op == "call_module":
        found = _module_mutation(gm, node)
    mutated = _first_input(node)
    if found is None or mutated is None:
        return None
    return _Mutation(node, mutated, found[0], found[1], _may_hold_tensor(mutated))


# ---------------------------------------------------------------- who shares storage with whom

def _merge(classes: dict[fx.Node, set[fx.Node]], a: fx.Node, b: fx.Node) -> None:
    """Union of the classes of ``a`` and ``b``; every member maps to the one shared set."""
    class_a, class_b = classes.setdefault(a, {a}), classes.setdefault(b, {b})
    if class_a is not class_b:
        class_a |= class_b
        classes.update(dict.fromkeys(class_b, class_a))


@dataclass(frozen=True)
class _Storage:
    same_tensor: dict[fx.Node, set[fx.Node]]    # in-place chains: one tensor object
    may_alias: dict[fx.Node, set[fx.Node]]      # views, in-place chains, unknown ops
    sources: frozenset[fx.Node]                 # storage possibly from outside the graph


def _storage_classes(gm: fx.GraphModule, mutations: dict[fx.Node, _Mutation]) -> _Storage:
    same_tensor: dict[fx.Node, set[fx.Node]] = {}
    may_alias: dict[fx.Node, set[fx.Node]] = {}
    sources = set()
    for node in gm.graph.nodes:
        mutation = mutations.get(node)
        if mutation is not None and mutation.on_tensor:
            _merge(same_tensor, node, mutation.mutated)
            _merge(may_alias, node, mutation.mutated)
            continue
        if node.op == "output" or not _may_hold_tensor(node):
            continue
        may_alias.setdefault(node, {node})
        effect = _storage_effect(gm, node)
        if effect in ("source", "unknown"):
            sources.add(node)
        if effect != "fresh":   # conservative: an unknown op may return any of its inputs
            for source in filter(_may_hold_tensor, node.all_input_nodes):
                _merge(may_alias, node, source)
    return _Storage(same_tensor, may_alias, frozenset(sources))


# ---------------------------------------------------------------- deciding

def _describe_source(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"placeholder {node.name}"
    if node.op == "get_attr":
        return f"module attribute {node.target}"
    return f"the output of {node.name}, whose aliasing is unknown"


def _unsafe_reason(mutation: _Mutation, storage: _Storage, order: _Order) -> Optional[str]:
    """Why ``mutation`` must stay in place, or None when rewriting it keeps the semantics."""
    node, what = mutation.node, f"in-place {mutation.label} (node {mutation.node.name})"
    if mutation.replacement is None:
        return f"{what} has no out-of-place form: keeping float"
    if not mutation.on_tensor:
        return None                     # python numbers have no aliases to see the change
    chain = storage.same_tensor[node]
    earlier = sorted((a for a in storage.may_alias[node] if order[a] < order[node]), key=order.get)
    # (a) the storage must be born in the graph: not an input, a module attribute or unknown.
    for alias in earlier:
        if alias in storage.sources:
            view = "" if alias in chain else "a view of "
            return f"{what} on {view}{_describe_source(alias)}: keeping float"
    # (b) no other name for that storage may be read after the mutation; the chain's own
    # names are fine: the rewrite points their later readers at the new node.
    for alias in (a for a in earlier if a not in chain):
        for reader in alias.users:
            if order[reader] > order[node] and not _reads_only_metadata(reader):
                return (f"{what} changes alias {alias.name}, read afterwards by {reader.name}: "
                        "keeping float")
    return None


def _float_closure(mutation: _Mutation, storage: _Storage, order: _Order) -> list[fx.Node]:
    """Everything sharing storage with a kept mutation, and every later reader of it."""
    members = storage.may_alias.get(mutation.node, frozenset({mutation.node}))
    readers = {user for member in members for user in member.users
               if order[user] > order[mutation.node] and user.op != "output"}
    return sorted(members | readers, key=order.get)


# ---------------------------------------------------------------- rewriting

def _functional_module_targets(
    gm: fx.GraphModule, safe: list[_Mutation], kept: list[_Mutation],
) -> dict[str, str]:
    """Turn ``inplace`` off on modules called only at safe sites; the others get a copy."""
    kept_modules = {id(get_module(gm, m.node)) for m in kept if m.node.op == "call_module"}
    targets: dict[str, str] = {}
    for mutation in safe:
        node = mutation.node
        if node.op != "call_module" or node.target in targets:
            continue
        module = get_module(gm, node)
        if id(module) in kept_modules:      # another call site stays in place: it keeps this one
            module = copy.deepcopy(module)
            targets[node.target] = add_submodule_unique(gm, f"{node.target}_out_of_place", module)
        else:
            targets[node.target] = node.target
        module.inplace = False
    return targets


def _insert_replacement(
    gm: fx.GraphModule, mutation: _Mutation, module_targets: dict[str, str],
) -> fx.Node:
    old, replacement = mutation.node, mutation.replacement
    args, kwargs = old.args, dict(old.kwargs)
    if replacement.rewrite_args is not None:
        args, kwargs = replacement.rewrite_args(args, kwargs)
    target = replacement.target
    if replacement.op == "call_module":
        target = module_targets[target]
    with gm.graph.inserting_after(old):
        new = gm.graph.create_node(replacement.op, target, tuple(args), kwargs)
    new.meta.update({key: value for key, value in old.meta.items() if key != "fxq"})
    fxq_meta(new)["changed_by"] = _PASS_NAME
    return new


def _rewire_later_readers(names: list[fx.Node], new: fx.Node, after: int, order: _Order) -> None:
    """Readers after the mutation saw the mutated tensor through any name it had before."""
    for node in names:
        for user in list(node.users):
            if order.get(user, -1) > after:
                user.replace_input_with(node, new)


def _rewrite(
    gm: fx.GraphModule, safe: list[_Mutation], kept: list[_Mutation], storage: _Storage,
    order: _Order,
) -> tuple[dict[fx.Node, fx.Node], list[str]]:
    module_targets = _functional_module_targets(gm, safe, kept)
    replaced: dict[fx.Node, fx.Node] = {}
    changes = []
    for mutation in safe:           # node order: a chain's later links see the earlier rewrites
        old = mutation.node
        new = _insert_replacement(gm, mutation, module_targets)
        order[new] = order[old]
        # FX emits ``operator.iadd(a, b)`` as ``a += b; iadd = a``: later reads of ``a`` see
        # the new value even for python numbers, so those are rewired too.
        chain = storage.same_tensor.get(old, frozenset({mutation.mutated}))
        earlier = [replaced.get(n, n) for n in chain if order[n] < order[old]]
        _rewire_later_readers(earlier, new, order[old], order)
        old.replace_all_uses_with(new)
        gm.graph.erase_node(old)
        replaced[old] = new
        changes.append(f"{mutation.label} -> {mutation.replacement.label} (node {old.name})")
    return replaced, changes


def functionalize_inplace(gm: fx.GraphModule) -> PassResult:
    """Replace provably local in-place ops with out-of-place ones; keep the rest in float."""
    mutations = [m for m in (_find_mutation(gm, n) for n in gm.graph.nodes) if m is not None]
    if not mutations:
        return finish(gm, [])
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    storage = _storage_classes(gm, {m.node: m for m in mutations})
    reasons = {m.node: _unsafe_reason(m, storage, order) for m in mutations}
    safe = [m for m in mutations if reasons[m.node] is None]
    kept = [m for m in mutations if reasons[m.node] is not None]
    closures = {m.node: _float_closure(m, storage, order) for m in kept}

    replaced, changes = _rewrite(gm, safe, kept, storage, order)
    for mutation in kept:               # own reasons first: keep_float keeps the first reason
        keep_float(mutation.node, reasons[mutation.node])
    for mutation in kept:
        why = f"shares storage with {mutation.node.name}, an in-place {mutation.label} left as is"
        for node in closures[mutation.node]:
            keep_float(replaced.get(node, node), f"{node.name} {why}: keeping float")
    return finish(gm, changes)
