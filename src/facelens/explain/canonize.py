"""Canonical form of a network for the hook-based explainers (Guided Backprop, DeepLIFT, LRP, EBP).

Hook-based methods see modules, not operations, so three things silently break them
(captum #156, #199, #546, #1082): an in-place operation, one module called twice (torchvision's
``BasicBlock`` calls ``self.relu`` twice) and work done in a container's own ``forward`` (a
residual ``out += identity``, a functional ``F.relu``). Our own ports are written canonically;
any other network is rewritten here, once, instead of failing:

* `canonical_copy` deep-copies the network with every in-place flag off, every module that is
  registered or called more than once split into one copy per call site (sharing its weights),
  and, via ``torch.fx`` traced one container at a time, every residual ``+`` turned into an
  explicit `Add` module and every functional ReLU into an ``nn.ReLU`` module. Containers that
  cannot be traced are left as they are and noted.
* `hookable` hands a method that copy after an audit: one forward pass under a
  ``TorchFunctionMode`` records every sum, product, nonlinearity and in-place operation done on
  activations outside a leaf module, and every module called twice. If anything the method cannot
  handle is left, it raises a `ModelError` naming the method, the module and the reason.
* `ExactMergeBatchNorm` folds each batch norm into the linear layer that feeds it, as zennit's
  ``SequentialMergeBatchNorm`` does, but leaves an exact identity behind and folds only pairs
  checked by `foldable_batch_norms`.
* `AddCanonizer` is the zennit canonizer for our two-input `Add` (and subclasses that pad before
  adding, as the dlib ports do): zennit's rules need single-input modules, so while attached the sum
  runs through a zennit ``Sum`` over the stacked branches.

The copy's parameters and buffers are *aliases* of the original's tensors (same storage, own
``Parameter`` objects): weight edits made in place on the original show through, no memory is
duplicated, and zennit's batch-norm merge, which rebinds ``.data``, only ever touches the copy.
"""

from __future__ import annotations

import copy
import itertools
import operator
import threading
import weakref
from collections import Counter
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm
from zennit.core import collect_leaves
from zennit.layer import Sum
from zennit.types import BatchNorm as ZennitBatchNorm
from zennit.types import Linear as ZennitLinear

from ..errors import ModelError
from ..models.layers import Add

__all__ = [
    "AddCanonizer",
    "ExactMergeBatchNorm",
    "Problem",
    "audit",
    "canonical_copy",
    "canonical_notes",
    "foldable_batch_norms",
    "hookable",
]

# -- the copy --------------------------------------------------------------------------------------------


def _alias(t: torch.Tensor) -> torch.Tensor:
    """Same storage, own tensor object: rebinding ``.data`` on one leaves the other alone."""
    if isinstance(t, nn.Parameter):
        return nn.Parameter(t.detach(), requires_grad=False)
    return t.detach()


def _alias_copy(net: nn.Module) -> nn.Module:
    """A deep copy of the module tree whose tensors alias the original's and which carries no hooks."""
    memo: dict[int, object] = {}
    for t in itertools.chain(net.parameters(), net.buffers()):
        memo[id(t)] = _alias(t)
    for m in net.modules():
        for key, value in vars(m).items():
            if "hooks" in key and isinstance(value, dict):
                memo[id(value)] = type(value)()
    return copy.deepcopy(net, memo)


def _tied_copy(module: nn.Module) -> nn.Module:
    """A second instance of ``module`` sharing its tensors (a split call site keeps its weights tied)."""
    memo: dict[int, object] = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def _switch_off_inplace(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False


def _split_registered_twice(net: nn.Module) -> None:
    """A module registered under two names (``Sequential(relu, conv, relu)``) gets one copy per name."""
    seen: set[int] = set()
    for path, module in list(net.named_modules(remove_duplicate=False)):
        if not path:
            continue
        if id(module) in seen:
            parent_path, _, name = path.rpartition(".")
            parent = net.get_submodule(parent_path) if parent_path else net
            setattr(parent, name, _tied_copy(module))
        else:
            seen.add(id(module))


class _ChildrenAsLeaves(fx.Tracer):
    """Trace one container's own ``forward``: every submodule call stays a single node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_NOT_TENSOR_METHODS = {"size", "dim", "numel", "stride", "item", "tolist"}


def _may_be_tensor(arg: object) -> bool:
    """False for graph values that are certainly shapes or numbers (``x.size(0) + 1``)."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "get_attr":
        return False  # a parameter or buffer: a constant, not a branch of the network
    if arg.op == "call_method" and arg.target in _NOT_TENSOR_METHODS:
        return False
    if arg.op == "call_function" and arg.target is getattr and len(arg.args) > 1 and arg.args[1] in ("shape", "ndim"):
        return False
    if arg.op == "call_function" and arg.target in (operator.getitem, operator.add, operator.mul, operator.sub,
                                                     operator.floordiv):
        return any(_may_be_tensor(a) for a in arg.args)
    return True


def _fresh_name(module: nn.Module, base: str) -> str:
    for k in itertools.count(1):
        name = f"{base}_{k}"
        if not hasattr(module, name):
            return name
    raise AssertionError("unreachable")


def _is_residual_add(node: fx.Node) -> bool:
    if node.kwargs:  # torch.add(a, b, alpha=...) is not a plain sum
        return False
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS)
    return is_add and len(node.args) == 2 and all(_may_be_tensor(a) for a in node.args)


def _is_functional_relu(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return len(node.args) >= 1 and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs


def _rewrite_forward(module: nn.Module) -> tuple[nn.Module, str | None]:
    """Trace ``module.forward`` and make sums, ReLUs and repeated calls explicit; (module, why not)."""
    try:
        graph = _ChildrenAsLeaves().trace(module)
    except Exception as exc:  # any tracing failure means "leave it as it is"
        return module, f"torch.fx cannot trace it: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    edits = 0
    calls: Counter[str] = Counter()
    for node in list(graph.nodes):
        if node.op == "call_module":
            calls[node.target] += 1
            if calls[node.target] > 1:  # a second call site gets its own instance
                name = _fresh_name(module, str(node.target).replace(".", "_") + "_call")
                module.add_module(name, _tied_copy(module.get_submodule(str(node.target))))
                node.target = name
                edits += 1
            continue
        replacement: nn.Module | None = None
        if _is_residual_add(node):
            replacement, base, args = Add(), "add", node.args
        elif _is_functional_relu(node):
            replacement, base, args = nn.ReLU(), "relu", node.args[:1]
        elif node.op == "call_function" and node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            edits += 1
        if replacement is not None:
            name = _fresh_name(module, base)
            module.add_module(name, replacement)
            with graph.inserting_before(node):
                new = graph.call_module(name, tuple(args))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            edits += 1
    if not edits:
        return module, None
    graph.lint()
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    gm.training = module.training  # not .train(): children keep their own modes
    return gm, None


def _is_container(module: nn.Module) -> bool:
    """Modules whose own ``forward`` is worth tracing: user code with children, not torch's built-ins."""
    if not any(True for _ in module.children()) or isinstance(module, (Add, fx.GraphModule)):
        return False
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and (
            type(module).forward is nn.Sequential.forward or not isinstance(module, nn.Sequential)):
        return False
    return not type(module).__module__.startswith("torch.")


def _rewrite_tree(module: nn.Module, path: str, notes: list[str]) -> nn.Module:
    for name, child in list(module.named_children()):
        new = _rewrite_tree(child, f"{path}.{name}" if path else name, notes)
        if new is not child:
            setattr(module, name, new)
    if not _is_container(module):
        return module
    new, why_not = _rewrite_forward(module)
    if why_not:
        notes.append(f"{path or '<root>'} ({type(module).__name__}): left as is, {why_not}")
    return new


def _build(net: nn.Module) -> tuple[nn.Module, list[str]]:
    notes: list[str] = []
    out = _alias_copy(net)
    _switch_off_inplace(out)
    out = _rewrite_tree(out, "", notes)
    _split_registered_twice(out)
    return out, notes


# -- the cache -------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    signature: tuple[object, ...]
    net: nn.Module
    notes: list[str]
    lock: threading.RLock = field(default_factory=threading.RLock)
    audits: dict[tuple[int, ...], list[Problem]] = field(default_factory=dict)


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _signature(net: nn.Module) -> tuple[object, ...]:
    """What the copy was built from: the module tree and the storage of every tensor.

    In-place weight edits keep the signature (the aliases see them); replacing a module,
    a parameter or a tensor's storage changes it, and the copy is rebuilt.
    """
    modules = tuple((name, id(m)) for name, m in net.named_modules(remove_duplicate=False))
    tensors = tuple((id(t), t.data_ptr(), tuple(t.shape)) for t in itertools.chain(net.parameters(), net.buffers()))
    return modules, tensors


def _entry(net: nn.Module) -> _Entry:
    sig = _signature(net)
    with _CACHE_LOCK:
        entry = _CACHE.get(net)
        if entry is None or entry.signature != sig:
            built, notes = _build(net)
            entry = _Entry(sig, built, notes)
            _CACHE[net] = entry
        return entry


def canonical_copy(net: nn.Module) -> nn.Module:
    """The canonical form of ``net`` (built once per network and cached; see the module docstring).

    It computes what ``net`` computes; the original is never modified.
    """
    return _entry(net).net


def canonical_notes(net: nn.Module) -> list[str]:
    """What `canonical_copy` could not rewrite (containers torch.fx could not trace), for reports."""
    return list(_entry(net).notes)


# -- the audit -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Something in a network that a hook-based method cannot see or handle.

    ``kind`` is ``reuse`` (a module called twice), ``sum`` or ``product`` (two activations combined
    in a container's forward), ``nonlinearity`` (a functional activation) or ``inplace``.
    """

    kind: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


_SUM_OPS = {"add", "sub", "radd", "rsub", "iadd", "isub"}
_PRODUCT_OPS = {"mul", "rmul", "imul", "div", "truediv", "rtruediv", "itruediv", "matmul", "rmatmul", "bmm",
                "mm", "einsum"}
_NONLINEAR_OPS = {"relu", "relu6", "sigmoid", "tanh", "gelu", "silu", "elu", "selu", "celu", "leaky_relu",
                  "hardtanh", "hardswish", "hardsigmoid", "softplus", "prelu", "mish", "softmax", "log_softmax",
                  "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "adaptive_max_pool2d",
                  "clamp", "clip", "abs", "maximum", "minimum", "max", "min"}


def _op_name(func: object) -> tuple[str, bool]:
    """(base name, in place) of a torch function or tensor method."""
    name = getattr(func, "__name__", str(func))
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core.startswith("i") and core[1:] in {"add", "sub", "mul", "truediv", "matmul"}:
            return core[1:], True
        if core.startswith("r") and core[1:] in {"add", "sub", "mul", "truediv", "matmul"}:
            return core[1:], False
        return core, False
    if name.endswith("_") and not name.startswith("_"):
        return name[:-1], True
    return name, False


def _activations(args: tuple[object, ...], kwargs: dict[str, object]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for a in itertools.chain(args, kwargs.values()):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, torch.Tensor) and t.requires_grad)
    return found


class _Recorder(TorchFunctionMode):
    """Records operations on activations that run in a container's own forward (hooks cannot see them)."""

    def __init__(self, stack: list[str], leaves: set[str], problems: list[Problem]) -> None:
        super().__init__()
        self.stack = stack
        self.leaves = leaves
        self.problems = problems

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self.stack and self.stack[-1] not in self.leaves:
            self._inspect(func, args, kwargs)
        return func(*args, **kwargs)

    def _inspect(self, func: object, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        name, inplace = _op_name(func)
        acts = _activations(args, kwargs)
        if not acts:
            return
        where = self.stack[-1] or "<root>"
        if inplace or kwargs.get("inplace") is True:
            self.problems.append(Problem("inplace", where, f"in-place {name} on an activation"))
        if name in _SUM_OPS and len(acts) >= 2:
            self.problems.append(Problem("sum", where, f"adds two activations with `{name}` in its forward "
                                         "instead of through an Add module"))
        elif name in _PRODUCT_OPS and len(acts) >= 2:
            self.problems.append(Problem("product", where, f"multiplies two activations (`{name}`) in its forward"))
        elif name in _NONLINEAR_OPS:
            self.problems.append(Problem("nonlinearity", where, f"applies `{name}` as a function in its forward, "
                                         "not as a module"))


def _is_leaf(module: nn.Module) -> bool:
    return isinstance(module, Add) or not any(True for _ in module.children())


def audit(net: nn.Module, x: torch.Tensor) -> list[Problem]:
    """Everything in ``net`` that module hooks cannot see, found by running it once on ``x``."""
    stack: list[str] = []
    leaves = {name for name, m in net.named_modules() if _is_leaf(m)}
    calls: Counter[str] = Counter()
    problems: list[Problem] = []
    handles = []

    def enter(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: object) -> None:
            stack.append(name)
            if name in leaves:
                calls[name] += 1
        return hook

    def leave(module: nn.Module, args: object, out: object) -> None:
        stack.pop()

    for name, m in net.named_modules():
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave, always_call=True))
    try:
        probe = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), _Recorder(stack, leaves, problems):
            net(probe)
    finally:
        for h in handles:
            h.remove()
    for name, n in calls.items():
        if n > 1:
            problems.append(Problem("reuse", name, f"is called {n} times in one forward pass"))
    unique = list(dict.fromkeys(problems))
    return unique


@contextmanager
def hookable(net: nn.Module, x: torch.Tensor, method: str, forbid: Collection[str]) -> Iterator[nn.Module]:
    """The canonical copy of ``net``, held for one hook-based attribution.

    Raises `ModelError` when the audit still finds a problem of a kind in ``forbid`` (see `Problem`),
    e.g. a residual sum inside a container torch.fx could not trace. Holding the copy's lock keeps
    two threads from hooking the same copy at once.
    """
    entry = _entry(net)
    with entry.lock:
        key = tuple(x.shape[1:])
        if key not in entry.audits:
            entry.audits[key] = audit(entry.net, x[:1])
        bad = [p for p in entry.audits[key] if p.kind in forbid]
        if bad:
            shown = "; ".join(str(p) for p in bad[:4]) + (f"; and {len(bad) - 4} more" if len(bad) > 4 else "")
            why = f" ({'; '.join(entry.notes)})" if entry.notes else ""
            raise ModelError(f"{method}: cannot put the network in canonical form: {shown}{why}")
        yield entry.net


# -- zennit canonizer for our Add ------------------------------------------------------------------------


def _sum_forward(self: Add, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` as ``Sum(stack([add(a, 0), add(0, b)]))``: each branch's share, padded as the add pads it.

    Because the add is linear in each operand, ``add(a, 0) + add(0, b) == add(a, b)`` for `Add` and
    for subclasses that zero-pad the smaller operand; anything else is refused rather than misread.
    """
    original = type(self).forward
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return original(self, a, b)
    share_a = original(self, a, torch.zeros_like(b))
    share_b = original(self, torch.zeros_like(a), b)
    with torch.no_grad():
        full = original(self, a, b)
        if not torch.allclose(share_a + share_b, full, rtol=1e-4, atol=1e-5):
            raise ModelError(f"{type(self).__name__} is not a sum of its two inputs; relevance rules cannot split it")
    return self.canonizer_sum(torch.stack([share_a, share_b], dim=-1))


class AddCanonizer(Canonizer):
    """Make every `Add` (and padding subclass) compute through a zennit ``Sum`` while attached.

    zennit's rules are written for single-input modules; its ``ResNetCanonizer`` does the same
    for torchvision's blocks. Removing the canonizer restores the module exactly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.module: Add | None = None

    def apply(self, root_module: nn.Module) -> list[AddCanonizer]:
        instances = []
        for module in root_module.modules():
            if isinstance(module, Add):
                instance = AddCanonizer()
                instance.register(module)
                instances.append(instance)
        return instances

    def register(self, module: Add) -> None:  # type: ignore[override]
        self.module = module
        module.canonizer_sum = Sum()
        module.forward = _sum_forward.__get__(module)  # type: ignore[method-assign]

    def remove(self) -> None:
        if self.module is not None:
            del self.module.forward
            del self.module.canonizer_sum
            self.module = None

    def copy(self) -> AddCanonizer:
        return AddCanonizer()


class ExactMergeBatchNorm(SequentialMergeBatchNorm):
    """zennit's ``SequentialMergeBatchNorm``, made exact and safe.

    * zennit resets a folded batch norm to mean 0 and variance 1 but keeps its ``eps``, so the
      layer still divides by ``√(1 + eps)``: 0.05 % per layer with Keras' eps of 1e-3, 0.7 % at
      fer-emotion's logits, enough for the relevance to explain a slightly different function. The
      variance is set to ``1 − eps`` instead.
    * zennit pairs a batch norm with the linear layer *registered* just before it, which is not
      always the one that feeds it: in a DenseNet, a layer's first batch norm reads the concatenation
      of all earlier features, not the convolution registered before it, and folding it there breaks
      the network. Given ``allowed`` (from `foldable_batch_norms`), only pairs whose folding was
      checked to leave the output unchanged are folded; the others keep their batch norm.
    """

    def __init__(self, allowed: Collection[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.allowed = None if allowed is None else frozenset(allowed)

    def copy(self) -> ExactMergeBatchNorm:
        return ExactMergeBatchNorm(self.allowed)

    def apply(self, root_module: nn.Module) -> list[ExactMergeBatchNorm]:
        instances = []
        for linear, norm in _adjacent_pairs(root_module):
            if self.allowed is None or (id(linear), id(norm)) in self.allowed:
                instance = self.copy()
                instance.register((linear,), norm)
                instances.append(instance)
        return instances

    @staticmethod
    def merge_batch_norm(modules, batch_norm):  # type: ignore[no-untyped-def]
        SequentialMergeBatchNorm.merge_batch_norm(modules, batch_norm)
        if batch_norm.eps < 1.0:
            batch_norm.running_var.data = torch.full_like(batch_norm.running_var.data, 1.0 - batch_norm.eps)


def _adjacent_pairs(root: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(linear, batch norm) pairs registered one after the other, with matching channel counts."""
    pairs = []
    last = None
    for leaf in collect_leaves(root):
        if isinstance(last, ZennitLinear) and isinstance(leaf, ZennitBatchNorm):
            out_channels = last.weight.shape[1 if isinstance(last, nn.modules.conv._ConvTransposeNd) else 0]
            if out_channels == leaf.num_features:
                pairs.append((last, leaf))
        last = leaf
    return pairs


_FOLDABLE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], frozenset[tuple[int, int]]]] = (
    weakref.WeakKeyDictionary())


def foldable_batch_norms(net: nn.Module, x: torch.Tensor) -> frozenset[tuple[int, int]]:
    """The (linear, batch norm) pairs of ``net`` that can be folded without changing its output on ``x``.

    Checked by folding: first all candidates at once (the usual case, one forward pass), and if
    the output moves, each candidate alone. Cached per network and input shape.
    """
    key = tuple(x.shape[1:])
    cache = _FOLDABLE.setdefault(net, {})
    if key in cache:
        return cache[key]
    probe = x[:1].detach()
    with torch.no_grad():
        expected = net(probe)

    def unchanged(pairs: list[tuple[nn.Module, nn.Module]]) -> bool:
        instances = []
        try:
            for linear, norm in pairs:
                instance = ExactMergeBatchNorm()
                instance.register((linear,), norm)
                instances.append(instance)
            with torch.no_grad():
                out = net(probe)
            return out.shape == expected.shape and bool(torch.allclose(out, expected, rtol=1e-4, atol=1e-5))
        except RuntimeError:  # a wrong pairing usually fails on shapes
            return False
        finally:
            for instance in instances:
                instance.remove()

    candidates = _adjacent_pairs(net)
    good = candidates if unchanged(candidates) else [pair for pair in candidates if unchanged([pair])]
    cache[key] = frozenset((id(linear), id(norm)) for linear, norm in good)
    return cache[key]
