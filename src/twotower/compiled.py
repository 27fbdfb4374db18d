"""The compiled decoding path: generation's hot functions through `torch.compile`.

Generation spends its time in two functions, called once per token or block with the same shapes
but a longer context each time:

* the context tower's cached continuation, `NemotronHModel.run_layers` with a cache (an AR decode
  step, a committed block, a drafted block being verified);
* the denoiser's block forward, `TwoTowerForCausalLM.denoise_hidden`.

At the embedded model's size such a call is hundreds of small operations, so it is bound by the
cost of launching them, not by arithmetic. `compile_for_decoding(model)` compiles both (gpt-fast
compiles its decode step the same way): inductor fuses the element-wise work between the matrix
products into generated C++/OpenMP kernels on CPU and Triton kernels on GPU, and the call runs as
one graph. Shapes are static but for the context length: the callers mark the keys' axis of the
attention K/V and masks dynamic (`plain_inputs`), so a new prompt length or a longer context never
compiles again; a new batch size, block size, mode or dtype compiles once more. A prompt's prefill
and anything with gradients stay eager.

The compiled path computes the same function (tests compare it with the eager one). Where it
differs in how:
* MoE: a graph cannot depend on which experts the tokens chose. With at most `DENSE_MAX_EXPERTS`
  experts, the layer keeps its experts' weights stacked (`moe.MoE.pack_experts`) and the graph
  gathers the chosen experts (fewer choices than experts: a decoding step) or runs every expert on
  every token, weighted 0 where not chosen (`moe.dense_mix`); with more experts, the dispatch to
  experts runs eagerly between graphs.
* `linear.Linear` is plain `F.linear` there: inductor chooses how to run a product.
"""

from __future__ import annotations

import time
from weakref import WeakKeyDictionary

import torch
from torch import nn

DENSE_MAX_EXPERTS = 16

# module -> {method name: CompiledFunction}; weak, so that a model that goes away takes its entry along
_COMPILED: WeakKeyDictionary = WeakKeyDictionary()


def _graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class CompiledFunction:
    """`fn(module, *args)` compiled. `compile_seconds`: the wall time of the calls that compiled a
    new graph (the compilation and that call's run). Callers pass their inputs through `plain` and
    `plain_inputs`."""

    def __init__(self, fn):
        self.fn = torch.compile(fn, dynamic=False)
        self.compile_seconds = 0.0

    def __call__(self, *args):
        before, start = _graphs_compiled(), time.perf_counter()
        out = self.fn(*args)
        if _graphs_compiled() != before:
            self.compile_seconds += time.perf_counter() - start
        return out


def plain(t):
    """t as a tensor of its own in the standard layout: a view (of a cache sliced or gathered in
    place, a kept prefix) is guarded on its base's layout and would compile again."""
    if isinstance(t, torch.Tensor) and (t._base is not None or not t.is_contiguous()):
        return t.clone(memory_format=torch.contiguous_format)
    return t


def plain_inputs(states: list, kinds, mask):
    """A tower's per-layer states (layer kinds `kinds`) and attention mask as the compiled functions
    take them: plain tensors (`plain`), with the context length, the keys' axis of the attention
    K/V [b, kv_heads, keys, d] and of the mask [..., keys], marked dynamic, so that one graph
    serves every prompt length and the context growing block by block."""
    out = []
    for kind, state in zip(kinds, states):
        if state is not None:
            state = tuple(plain(t) for t in state)
            if kind == "attention":
                for t in state:
                    torch._dynamo.maybe_mark_dynamic(t, 2)
        out.append(state)
    if isinstance(mask, torch.Tensor):
        mask = plain(mask)
        torch._dynamo.maybe_mark_dynamic(mask, mask.dim() - 1)
    return out, mask


def compile_for_decoding(model: nn.Module) -> nn.Module:
    """Switch the compiled path on for `model`: every submodule whose class lists methods in
    `compiled_methods` gets them compiled, and every MoE layer with at most `DENSE_MAX_EXPERTS`
    experts stacks their weights (`moe.MoE.pack_experts`). Compilation itself happens at a
    function's first call (and for each new batch size or block size). Idempotent (a generate call
    with the compiled path on runs it again, which repacks any MoE whose parameters were
    replaced); returns the model."""
    for module in model.modules():
        names = getattr(type(module), "compiled_methods", ())
        if names and module not in _COMPILED:
            _COMPILED[module] = {name: CompiledFunction(getattr(type(module), name)) for name in names}
        if getattr(module, "mixes_in_graph", False) and not module.packed_is_current():
            module.pack_experts()  # the MoE reads its experts' stacked weights in the graph
    return model


def compiled_version(module: nn.Module, name: str) -> CompiledFunction | None:
    """The compiled `name` method of `module`, called as fn(module, ...), when the compiled path is
    on for it and gradients are off; else None (run the method itself)."""
    if torch.is_grad_enabled():
        return None
    functions = _COMPILED.get(module)
    return None if functions is None else functions.get(name)


def is_compiled(model: nn.Module) -> bool:
    """Whether `compile_for_decoding` switched the compiled path on for `model`."""
    return any(module in _COMPILED for module in model.modules())


def compile_seconds(model: nn.Module) -> float:
    """Seconds spent so far in calls of `model`'s compiled functions that compiled a graph."""
    return sum(fn.compile_seconds for module in model.modules() for fn in _COMPILED.get(module, {}).values())
