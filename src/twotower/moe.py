"""The NemotronH mixture-of-experts layer (transformers' `modeling_nemotron_h.py`; the router is
DeepSeek-V3's, arXiv:2412.19437).

Sigmoid router; the correction bias only chooses the experts, the unbiased scores weight them;
top-k weights are normalised and scaled by `routed_scaling_factor`; every token also goes
through the shared expert.
"""

from __future__ import annotations

import torch
from torch import nn

from .compiled import DENSE_MAX_EXPERTS
from .config import ROUTER_DTYPES
from .mlp import MLP, relu2_
from .precision import without_autocast


@without_autocast
def route(
    u: torch.Tensor,
    weight: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
):
    """Choose experts for each token. u [t, d] -> (expert ids [t, k], weights [t, k] in `dtype`),
    computed in `dtype` under autocast too."""
    scores = torch.sigmoid(u.to(dtype) @ weight.to(dtype).T)  # [t, e]
    choice = scores + correction_bias.to(dtype)
    if n_group > 1:  # keep the experts of the `topk_group` best groups (a group scores its best two)
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)
        best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
        keep = torch.zeros(t, n_group, dtype=torch.bool, device=u.device).scatter_(1, best_groups, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(t, e)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


class Router(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.dtype = ROUTER_DTYPES[config.router_dtype]

    def forward(self, u: torch.Tensor):
        return route(
            u, self.weight, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
            self.norm_topk_prob, self.scaling, self.dtype,
        )


def _stacked(experts, name: str):
    """One projection of every expert stacked: weight [E, out, in] and bias [E, out] or None."""
    projections = [getattr(expert, name) for expert in experts]
    bias = None if projections[0].bias is None else torch.stack([p.bias for p in projections])
    return torch.stack([p.weight for p in projections]), bias


def dense_mix(experts, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, packed=None) -> torch.Tensor:
    """sum_j w_j * expert_{id_j}(x) for tokens flat [t, d] as one graph whatever the routing, for
    the compiled path (`twotower.compiled`): batched products over the experts' stacked weights
    (`packed`, from `MoE.pack_experts`, else stacked here), of the chosen experts only when the
    t * k choices are fewer than the experts (a decoding step), else of every expert on every token,
    weighted by its routing weight (0 where not chosen). -> float32 [t, d]."""
    up, up_bias, down, down_bias = packed or (*_stacked(experts, "up_proj"), *_stacked(experts, "down_proj"))
    t, k = ids.shape
    if t * k < len(experts):
        chosen = ids.flatten()
        x = flat.repeat_interleave(k, dim=0)[:, :, None]  # [t k, d, 1]
        h = torch.bmm(up[chosen], x)[..., 0]
        h = relu2_(h if up_bias is None else h + up_bias[chosen])
        out = torch.bmm(down[chosen], h[:, :, None])[..., 0]  # [t k, d]
        out = out if down_bias is None else out + down_bias[chosen]
        return (out.float().view(t, k, -1) * weights[..., None]).sum(1)
    h = torch.matmul(flat, up.transpose(1, 2))  # [E, t, f]
    h = relu2_(h if up_bias is None else h + up_bias[:, None])
    out = torch.matmul(h, down.transpose(1, 2))  # [E, t, d]
    out = out if down_bias is None else out + down_bias[:, None]
    gate = torch.zeros(t, len(experts), dtype=torch.float32, device=flat.device).scatter_(1, ids, weights.float())
    return torch.einsum("etd,te->td", out.float(), gate)


@torch.compiler.disable
def grouped_mix(experts, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j w_j * expert_{id_j}(x), running each expert on the tokens that chose it: tokens are
    grouped by expert (one matmul pair per expert that has tokens), not looped over; a single token
    (a decoding step) calls its k experts directly, in expert order as the groups are. Eager always
    (its work depends on the routing). -> float32 [t, d]."""
    if flat.shape[0] == 1:
        chosen = sorted(zip(ids[0].tolist(), weights[0].tolist()))
        return sum(experts[e](flat).float() * w for e, w in chosen)
    top_k = ids.shape[1]
    order = ids.flatten().argsort(stable=True)  # assignments sorted by expert
    tokens = order // top_k
    counts = torch.bincount(ids.flatten(), minlength=len(experts)).tolist()
    inputs, scales = flat[tokens], weights.flatten()[order, None].float()
    # in training every expert runs, chosen or not (an empty batch for the unchosen), so each gets a
    # gradient, if zero: DDP and FSDP2 need the same gradients on every rank
    every = torch.is_grad_enabled() and experts[0].up_proj.weight.requires_grad
    outputs, start = [], 0
    for expert, count in zip(experts, counts):
        if count or every:
            outputs.append(expert(inputs[start:start + count]) * scales[start:start + count])
            start += count
    return torch.zeros_like(flat, dtype=torch.float32).index_add_(0, tokens, torch.cat(outputs))


class MoE(nn.Module):
    """forward(u [b, l, d]) -> [b, l, d]: sum_j w_j * expert_{id_j}(u) + shared_expert(u).

    Eagerly the experts run on the tokens that chose them (`grouped_mix`); compiled, with few
    experts, the graph mixes them from their stacked weights (`dense_mix`, `pack_experts`).
    """

    def __init__(self, config):
        super().__init__()
        self.gate = Router(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size, config.mlp_bias)
            for _ in range(config.n_routed_experts)
        )
        self.shared_experts = MLP(config.hidden_size, config.moe_shared_expert_intermediate_size, config.mlp_bias)

    packed = None  # (up [E, f, d], up bias, down [E, d, f], down bias) once `pack_experts` ran

    def pack_experts(self) -> None:
        """Stack each projection's expert weights into one tensor and make every expert's parameters
        views of it: the same parameters, names and memory, with the stacked form at hand for the
        compiled path, which gathers the chosen experts from it (stacking them anew in a graph would
        read and write every expert's weights at every step). Parameters updated in place stay
        packed; `_apply` (`.to()`, `.half()`) packs again; `compiled.compile_for_decoding` packs,
        and repacks a layer whose parameters were replaced."""
        with torch.no_grad():
            stacked = {name: _stacked(self.experts, name) for name in ("up_proj", "down_proj")}
            for e, expert in enumerate(self.experts):
                for name, (weight, bias) in stacked.items():
                    getattr(expert, name).weight.data = weight[e]
                    if bias is not None:
                        getattr(expert, name).bias.data = bias[e]
        self.packed = (*stacked["up_proj"], *stacked["down_proj"])

    @property
    def mixes_in_graph(self) -> bool:
        """Whether the compiled path runs this layer's experts inside its graph (few experts)."""
        return len(self.experts) <= DENSE_MAX_EXPERTS

    def packed_is_current(self) -> bool:
        """Whether every expert's weight is still its view of the packed tensors."""
        if self.packed is None:
            return False
        up, down = self.packed[0], self.packed[2]
        return all(expert.up_proj.weight.data_ptr() == up[e].data_ptr()
                   and expert.down_proj.weight.data_ptr() == down[e].data_ptr() for e, expert in enumerate(self.experts))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.packed is not None:  # the parameters are new tensors now
            self.pack_experts()
        return self

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        flat = u.reshape(-1, u.shape[-1])
        ids, weights = self.gate(flat)
        if torch.compiler.is_compiling() and self.mixes_in_graph:
            routed = dense_mix(self.experts, flat, ids, weights, self.packed)
        else:
            routed = grouped_mix(self.experts, flat, ids, weights)
        return (routed.to(u.dtype) + self.shared_experts(flat)).view_as(u)
