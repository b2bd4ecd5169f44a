"""Data-parallel synchronisation for the generator/classifier training loop (torch only).

The generator's losses are *batch-global*: the MMD compares every synthetic feature with
every real one, the alignment KL compares every pair, and the classifier's weighted
cross-entropy divides by the batch's total class weight. Averaging per-worker gradients of
per-worker losses (what plain DDP does) therefore does *not* give the gradient of the
global batch. W workers compute exactly what one worker computes on the union of their rows,
and each does only its own rows' part of the work (docs/architecture.md, "Distributed training"):

1. each worker computes its rows' share of every term against the columns gathered from all
   workers (:mod:`pading.training.objective`); the gathered columns are leaves, and their
   gradients are summed over the workers in one all-reduce and returned to the rows' owners;
2. after ``backward`` every parameter's gradient holds its worker's share; summing them over
   the workers (:meth:`TorchCollective.sum_gradients`) gives the global gradient exactly.

:class:`LocalCollective` is the one-process case (identity gather, no reduction): the
single-process path of the same code. Nothing here imports Ray: a Ray Train worker has an
initialised ``torch.distributed`` process group, and :func:`default_collective` picks it up.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


class LocalCollective:
    """One worker: gather is the identity and gradients stay as they are."""

    world_size = 1
    rank = 0

    def gather(self, tensor: torch.Tensor, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(n_r, ...) on every rank -> (sum_r n_r, ...) in rank order, differentiable;
        ``sizes``: every rank's n_r, when the caller knows them (saves a collective)."""
        return tensor

    def row_counts(self, count: int) -> list[int]:
        """Every rank's ``count``, in rank order."""
        return [int(count)]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (no gradient)."""
        return tensor

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter],
                      extras: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Replace every gradient by its sum over ranks; ``extras`` (a 1-d tensor) is summed in
        the same call and returned."""
        return self.sum_gradients_async(parameters, extras).wait()

    def sum_gradients_async(self, parameters: Iterable[torch.nn.Parameter],
                            extras: Optional[torch.Tensor] = None) -> "PendingSum":
        """Start :meth:`sum_gradients`; the gradients are summed once ``wait()`` returns (other
        work can run meanwhile, on tensors the reduction does not touch)."""
        return PendingSum(None, None, [], extras)


class PendingSum:
    """A gradient reduction in flight; :meth:`wait` finishes it and returns the summed extras."""

    def __init__(self, work, flat: Optional[torch.Tensor], params: list, extras: Optional[torch.Tensor]):
        self._work, self._flat, self._params, self._extras = work, flat, params, extras

    def wait(self) -> Optional[torch.Tensor]:
        if self._work is None:
            return self._extras
        self._work.wait()
        flat, params = self._flat, self._params
        num_extras = 0 if self._extras is None else self._extras.numel()
        offset = len(params) + num_extras
        touched = flat[:len(params)].tolist()  # one read of the flags
        for param, flag in zip(params, touched):
            size = param.numel()
            # a parameter no rank touched keeps grad None, as in the one-process run (the optimiser skips it)
            param.grad = flat[offset:offset + size].view_as(param).to(param.dtype) if flag > 0 else None
            offset += size
        return None if self._extras is None else flat[len(params):len(params) + num_extras].to(self._extras.dtype)


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

    def _device(self) -> torch.device:
        """Where this group's collectives take their tensors (NCCL: the current GPU)."""
        if self._dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def row_counts(self, count: int) -> list[int]:
        local = torch.tensor([count], dtype=torch.long, device=self._device())
        counts = [torch.zeros_like(local) for _ in range(self.world_size)]
        self._dist.all_gather(counts, local)
        return [int(c.item()) for c in counts]

    def gather(self, tensor: torch.Tensor, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
        # all_gather needs one shape on every rank: pad to the longest, trim.
        sizes = list(sizes) if sizes is not None else self.row_counts(tensor.shape[0])
        if sizes[self.rank] != tensor.shape[0]:
            raise RuntimeError(f"gather: rank {self.rank} has {tensor.shape[0]} rows, sizes say {sizes[self.rank]}")
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
        reduced = tensor.detach().to(self._device(), copy=True)  # NCCL reduces GPU tensors only
        self._dist.all_reduce(reduced)
        return reduced.to(tensor.device)

    def sum_gradients_async(self, parameters: Iterable[torch.nn.Parameter],
                            extras: Optional[torch.Tensor] = None) -> PendingSum:
        """One all-reduce of every gradient (and of ``extras``), flattened into one buffer with a
        has-gradient flag per parameter."""
        params = [p for p in parameters if p.requires_grad]
        device = params[0].device if params else self._device()
        dtype = torch.promote_types(torch.float32, extras.dtype) if extras is not None else torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)  # float64 gradients are summed in float64
        flags = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=device, dtype=dtype)
        parts = [flags] + ([extras.detach().reshape(-1).to(device, flags.dtype)] if extras is not None else [])
        parts += [p.grad.reshape(-1).to(flags.dtype) if p.grad is not None else flags.new_zeros(p.numel())
                  for p in params]
        flat = torch.cat(parts)
        return PendingSum(self._dist.all_reduce(flat, async_op=True), flat, params, extras)


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


#: Multiply-adds of a step's classifier pass (rows x classes x D) below which W > 1 workers are slower
#: than one on CPU: the step's fixed costs (optimiser, primitive projections, collectives) are not divided
#: (benchmarks/generator_scaling.py; docs/architecture.md, "Distributed training").
DIVIDE_MIN_WORK = 1e8


def worth_dividing(rows_per_step: int, num_classes: int, embed_dim: int) -> bool:
    """Whether a generator step of ``rows_per_step`` query rows over ``num_classes`` classes
    has enough work to gain from more than one worker (``rows x (C + 1) x D >= DIVIDE_MIN_WORK``)."""
    return rows_per_step * (num_classes + 1) * embed_dim >= DIVIDE_MIN_WORK


def default_collective() -> LocalCollective:
    """:class:`TorchCollective` inside an initialised process group of more than one rank
    (e.g. a Ray Train worker of a multi-worker run), else :class:`LocalCollective`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollective()
    return LocalCollective()
