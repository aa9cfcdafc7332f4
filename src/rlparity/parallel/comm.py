"""The collectives of sequence parallelism, as autograd Functions whose backward is the transpose.

Tensors are laid out [batch, heads, seq, *rest] as in the attention contract. `group=None` is the
default process group. With one rank every function is the identity and sends nothing.
"""

import torch
import torch.distributed as dist


def world_and_rank(group=None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _global_rank(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def seq_to_head_shards(x: torch.Tensor, group=None) -> torch.Tensor:
    """[B, H, S/P, *r] on every rank -> [B, H/P, S, *r]: rank p keeps heads p*H/P.., all positions."""
    world, _ = world_and_rank(group)
    if world == 1:
        return x
    b, h, s, *rest = x.shape
    # [B, H, S/P, r] -> [P, B, H/P, S/P, r]: the chunk for rank p first
    send = x.reshape(b, world, h // world, s, *rest).movedim(1, 0).contiguous()
    received = torch.empty_like(send)  # [P, B, H/P, S/P, r]: the shard of sequence from rank p
    dist.all_to_all_single(received, send, group=group)
    # -> [B, H/P, P, S/P, r] -> [B, H/P, S, r]
    return received.movedim(0, 2).reshape(b, h // world, world * s, *rest)


def head_to_seq_shards(x: torch.Tensor, group=None) -> torch.Tensor:
    """[B, H/P, S, *r] -> [B, H, S/P, *r]: the inverse of seq_to_head_shards."""
    world, _ = world_and_rank(group)
    if world == 1:
        return x
    b, h_local, s, *rest = x.shape
    # [B, H/P, S, r] -> [P, B, H/P, S/P, r]: the sequence shard of rank p first
    send = x.reshape(b, h_local, world, s // world, *rest).movedim(2, 0).contiguous()
    received = torch.empty_like(send)  # [P, B, H/P, S/P, r]: head group p, my sequence shard
    dist.all_to_all_single(received, send, group=group)
    # -> [B, P, H/P, S/P, r] -> [B, H, S/P, r]
    return received.movedim(0, 1).reshape(b, world * h_local, s // world, *rest)


class SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return seq_to_head_shards(x, group)

    @staticmethod
    def backward(ctx, grad):
        return head_to_seq_shards(grad.contiguous(), ctx.group), None


class HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return head_to_seq_shards(x, group)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_head_shards(grad.contiguous(), ctx.group), None


def exchange(tensor: torch.Tensor, send_to: int, receive_from: int, group=None) -> tuple[torch.Tensor, list]:
    """Start sending `tensor` to group rank `send_to` and receiving one like it from `receive_from`:
    (the receive buffer, the requests to wait on before reading it)."""
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), _global_rank(group, send_to), group),
           dist.P2POp(dist.irecv, received, _global_rank(group, receive_from), group)]
    return received, dist.batch_isend_irecv(ops)


def shift(tensor: torch.Tensor, steps: int = 1, group=None) -> torch.Tensor:
    """The tensor of rank (r - steps) arrives on rank r: one hop (or `steps` hops) around the ring."""
    world, rank = world_and_rank(group)
    if world == 1 or steps % world == 0:
        return tensor
    received, requests = exchange(tensor, (rank + steps) % world, (rank - steps) % world, group)
    for request in requests:
        request.wait()
    return received


class Shift(torch.autograd.Function):
    """shift() with gradients: the gradient travels the ring the other way."""

    @staticmethod
    def forward(ctx, x, steps, group):
        ctx.steps, ctx.group = steps, group
        return shift(x, steps, group)

    @staticmethod
    def backward(ctx, grad):
        return shift(grad, -ctx.steps, ctx.group), None, None


class ShardOf(torch.autograd.Function):
    """This rank's contiguous piece of a tensor every rank holds whole; the backward gathers the pieces.

    A single-process view of a sequence-parallel function for tests: full tensors in, full gradients out.
    """

    @staticmethod
    def forward(ctx, x, dim, group):
        world, rank = world_and_rank(group)
        ctx.dim, ctx.group = dim, group
        return x.chunk(world, dim=dim)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return gather_shards(grad, ctx.dim, ctx.group), None, None


class GatherShards(torch.autograd.Function):
    """Every rank's piece concatenated in rank order; the backward keeps this rank's piece of the gradient.

    Only right when every rank back-propagates the same gradient (one loss computed on every rank).
    """

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return gather_shards(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        world, rank = world_and_rank(ctx.group)
        return grad.chunk(world, dim=ctx.dim)[rank].contiguous(), None, None


class SumGradients(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over ranks: a replicated parameter's gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.group), None


def gather_shards(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    world, _ = world_and_rank(group)
    if world == 1:
        return x
    pieces = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    world, _ = world_and_rank(group)
    if world == 1:
        return x
    total = x.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total
