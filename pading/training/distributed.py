"""Data-parallel synchronisation for the generator/classifier training loop (torch only).

The generator's losses are *batch-global*: the MMD compares every synthetic feature with
every real one, the alignment KL compares every pair, and the classifier's weighted
cross-entropy divides by the batch's total class weight. Averaging per-worker gradients of
per-worker losses (what plain DDP does) therefore does *not* give the gradient of the
global batch. :class:`TorchCollective` makes W workers compute exactly what one worker
computes on the union of their rows (docs/architecture.md, "Distributed training"):

1. features each worker produced (real rows, synthetic rows *with* their autograd graph)
   are all-gathered in rank order, so every worker evaluates the identical global loss;
2. after ``backward`` the gradients are all-reduced: a parameter's gradient on worker r
   holds W x (the contribution of r's rows, through the gather) + (the direct paths), so
   summing over workers and dividing by W gives the global gradient exactly.

:class:`LocalCollective` is the one-process case (identity gather, no reduction): the
single-process path of the same code. Nothing here imports Ray: a Ray Train worker has an
initialised ``torch.distributed`` process group, and :func:`default_collective` picks it up.
"""

from __future__ import annotations

from typing import Iterable

import torch


class LocalCollective:
    """One worker: gather is the identity and gradients stay as they are."""

    world_size = 1
    rank = 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(n_r, ...) on every rank -> (sum_r n_r, ...) in rank order, differentiable."""
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (no gradient)."""
        return tensor

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over ranks."""

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its sum over ranks."""


class TorchCollective(LocalCollective):
    """The collective of an initialised ``torch.distributed`` process group (gloo or NCCL).

    Every method is a collective call: all ranks must call it, in the same order.
    """

    def __init__(self):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchCollective needs an initialised torch.distributed process group")
        self._dist = dist
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        # all_gather needs one shape on every rank: gather the row counts, pad, trim.
        count = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        self._dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        longest = max(sizes)
        padded = tensor
        if tensor.shape[0] < longest:
            padding = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
            padded = torch.cat([tensor, padding], dim=0)
        if tensor.requires_grad:
            gathered = _AllGather.apply(padded)  # (W * longest, ...)
        else:
            gathered = _all_gather(padded.detach())
        return torch.cat([gathered[r * longest : r * longest + size] for r, size in enumerate(sizes)], dim=0)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.detach().clone()
        self._dist.all_reduce(reduced)
        return reduced

    def _reduce_gradients(self, parameters: Iterable[torch.nn.Parameter], divide: bool) -> None:
        """One all-reduce of every gradient, flattened into one buffer (plus a has-gradient
        flag per parameter, so a parameter no rank touched keeps ``grad = None``, as in the
        one-process run, and the optimiser skips it)."""
        params = [p for p in parameters if p.requires_grad]
        if not params:
            return
        device = params[0].device
        flags = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=device)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([flags] + [g.reshape(-1).to(flags.dtype) for g in grads])
        self._dist.all_reduce(flat)
        if divide:
            flat[len(params):] /= self.world_size
        offset = len(params)
        for i, (param, grad) in enumerate(zip(params, grads)):
            size = grad.numel()
            if flat[i] > 0:
                param.grad = flat[offset : offset + size].view_as(param).to(param.dtype).clone()
            else:
                param.grad = None
            offset += size

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self._reduce_gradients(parameters, divide=True)

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self._reduce_gradients(parameters, divide=False)


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 that back-propagates: the gradient of a rank's input is the
    sum over ranks of the gradient of its slice (all-reduce, then take the own slice)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return _all_gather(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def default_collective() -> LocalCollective:
    """:class:`TorchCollective` inside an initialised process group of more than one rank
    (e.g. a Ray Train worker of a multi-worker run), else :class:`LocalCollective`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollective()
    return LocalCollective()
