"""nn.Linear with a multi-threaded CPU path for matrix products of a few rows in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_MAX_ROWS = 16
SPLIT_MIN_WEIGHTS = 2**17  # below this a second thread costs more than it saves


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    """F.linear(x, weight, bias) as one batched matmul over `parts` equal slices of the output
    features, which the intra-op threads share. x [..., k], weight [n, k] contiguous, n % parts == 0."""
    rows = x.reshape(-1, x.shape[-1])
    n, k = weight.shape
    out = torch.bmm(rows.expand(parts, -1, -1), weight.view(parts, n // parts, k).transpose(1, 2))
    out = out.transpose(0, 1).reshape(*x.shape[:-1], n)
    return out if bias is None else out + bias


class Linear(nn.Linear):
    """nn.Linear (same parameters and names). On CPU in float32, a product of at most 16 rows (a
    decoding step, a 16-token block, the few tokens routed to one expert) runs on one thread in
    the BLAS library, leaving the other cores idle; for weights of 2^17 entries or more such
    products go through `split_linear` instead (the README's Performance section gives the
    measured gain). There, at these sizes, the results were bitwise F.linear's; in general they
    agree to float rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inductor chooses how to run the product
            return F.linear(x, self.weight, self.bias)
        if (x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() <= SPLIT_MAX_ROWS * self.in_features
                and self.weight.numel() >= SPLIT_MIN_WEIGHTS and self.weight.is_contiguous()):
            parts = torch.get_num_threads()
            if parts > 1 and self.out_features % parts == 0:
                return split_linear(x, self.weight, self.bias, parts)
        return F.linear(x, self.weight, self.bias)
