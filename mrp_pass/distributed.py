"""The pass on several processes with torch.distributed: data-parallel calibration, row-parallel solves.

Every rank holds the whole model and is given the whole calibration list (as a single process would be); it
walks its contiguous share of the samples (uneven shares allowed). At each layer group:

  * its Hessian is summed over ranks with its token count: all_reduce of n_r * H_r and of n_r (the count rides
    on the status exchange below), then H = sum / sum n. Hessian keeps a running mean, hence the n_r * H_r.
    Every rank ends with the same H (an all_reduce gives every rank the same sum);
  * each weight's rows are split across ranks (contiguous shares) and solved given that H: every method is
    row-independent given H except for the whole-matrix quantities `solvers.RowShard` reduces (the
    power-of-two scale from max|W|, the conjugate-gradient stopping test, ADMM's GEMM order, loss and relative
    error), so a share's rows come out as a one-process solve of the whole weight gives them given the same H.
    The shares are all_gather'ed byte for byte: every rank writes the same pruned weight and walks on.

Failures: before each group's Hessian is reduced, after each layer is solved and at the end, the ranks
exchange their status (all_gather_object). A rank that fails tells the others at that exchange instead of
reaching its next collective; every rank then raises (the failed ones their own error, the others a
`RankFailure` naming the rank and its error) and rolls back as a single process does. A failure inside a solve
between its own reductions, or a rank that dies, is not caught by the exchange: the others get the process
group's error or its timeout.

`prune` uses the process group that is initialised (or one from torchrun's RANK / WORLD_SIZE / MASTER_ADDR
environment, created here with gloo for CPU tensors and NCCL for CUDA ones); `mrp prune --nproc N` spawns N
gloo processes on the CPU (`commands.spawn_prune`)."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from export.errors import add_note

from . import solvers

log = logging.getLogger(__name__)


class RankFailure(RuntimeError):
    """Another rank failed: this one stopped with it (and rolled back)."""


@dataclass(frozen=True)
class Context:
    """The process group the pass runs in (torch.distributed's default group)."""

    rank: int
    world: int

    def share(self, n: int, rank: int | None = None) -> slice:
        """This rank's contiguous share of n items: the first n % world ranks take one more."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        start = rank * base + min(rank, extra)
        return slice(start, start + base + (rank < extra))

    def exchange(self, error: BaseException | None = None, payload=None) -> list[tuple[str | None, object]]:
        """(error message or None, payload) of every rank, in rank order."""
        mine = (None if error is None else f"{type(error).__name__}: {error}", payload)
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, mine)
        return everyone

    def agree(self, payload=None) -> list:
        """Every rank's payload; RankFailure on every healthy rank when some rank reported a failure."""
        everyone = self.exchange(None, payload)
        failed = [(r, msg) for r, (msg, _) in enumerate(everyone) if msg is not None]
        if failed:
            said = "; ".join(f"rank {r} failed with {msg}" for r, msg in failed)
            raise RankFailure(f"mrp_pass: {said} (rank {self.rank} of {self.world} stopped with it)")
        return [p for _, p in everyone]

    def max(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def sum(self, x: float) -> float:
        t = torch.tensor(x, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return float(t)

    def gather_rows(self, part: torch.Tensor, rows: int) -> torch.Tensor:
        """The whole [rows, ...] tensor from every rank's share of its rows, byte for byte (any dtype)."""
        shares = [self.share(rows, r) for r in range(self.world)]
        most = max(s.stop - s.start for s in shares)
        raw = part.contiguous().view(torch.uint8) if part.dtype != torch.bool else part.to(torch.uint8)
        padded = raw.new_zeros((most, *raw.shape[1:]))
        padded[: raw.shape[0]] = raw
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        whole = torch.cat([o[: s.stop - s.start] for o, s in zip(out, shares)])
        return whole.bool() if part.dtype == torch.bool else whole.view(part.dtype)


def _comm_device() -> torch.device:
    """Where small tensors for collectives live: the CUDA device under NCCL, else the CPU."""
    backend = str(dist.get_backend())
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def detect() -> Context | None:
    """The process group this process belongs to (more than one rank), initialising it from torchrun's
    environment when it is not yet; None for a single process."""
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
            return None
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend)
        log.info("initialised a %s process group from the environment: rank %d of %d", backend, dist.get_rank(),
                 dist.get_world_size())
    world = dist.get_world_size()
    return Context(dist.get_rank(), world) if world > 1 else None


def is_main(ctx: Context | None) -> bool:
    return ctx is None or ctx.rank == 0


def _fingerprint(items: list) -> str:
    digest = hashlib.sha1()
    for leaf in pytree.tree_leaves(items):
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{t.dtype}{tuple(leaf.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(leaf).encode())
    return digest.hexdigest()


def start(items: list) -> Context | None:
    """The pass's process group, after checking that every rank was given the same calibration samples (each
    takes its share of them) and that there are enough of them: ValueError on every rank otherwise."""
    ctx = detect()
    if ctx is None:
        return None
    prints = ctx.agree((len(items), _fingerprint(items)))
    if len(set(prints)) > 1:
        raise ValueError(f"the {ctx.world} ranks were given different calibration samples ({[n for n, _ in prints]} "
                         "samples): give every rank the same list; the pass takes each rank's share of it")
    if len(items) < ctx.world:
        raise ValueError(f"{len(items)} calibration samples for {ctx.world} ranks: every rank needs at least one")
    share = ctx.share(len(items))
    log.info("rank %d of %d calibrates on samples %d..%d of %d", ctx.rank, ctx.world, share.start, share.stop - 1,
             len(items))
    return ctx


def my_share(ctx: Context | None, samples: list) -> list:
    return samples if ctx is None else samples[ctx.share(len(samples))]


def reduce_hessian(ctx: Context | None, hessian) -> None:
    """Sum a group's Hessian over the ranks, weighted by their token counts: H = sum n_r H_r / sum n_r.
    Raises RankFailure first when a rank failed since the last exchange."""
    if ctx is None:
        return
    counts = ctx.agree(hessian.nsamples)
    total = sum(counts)
    if total == 0:
        return
    hessian.matrix.mul_(hessian.nsamples)
    dist.all_reduce(hessian.matrix)
    hessian.matrix.div_(total)
    hessian.nsamples = total


def solve(ctx: Context | None, solve_fn, weight: torch.Tensor, hessian: torch.Tensor, *args,
          **kwargs) -> solvers.SolveResult:
    """`solve_fn` (`solvers.solve`) with the weight's rows split across the ranks and gathered back: every rank
    gets the whole result. A weight with fewer rows than ranks is solved whole on every rank."""
    if ctx is None or weight.dim() != 2 or weight.shape[0] < ctx.world:
        return solve_fn(weight, hessian, *args, **kwargs)
    t0 = time.perf_counter()
    if not torch.isfinite(weight).all():  # before any exchange: every rank holds the whole weight and says it alike
        raise FloatingPointError("the weight contains NaN or Inf")
    rows = weight.shape[0]
    shard = solvers.RowShard(rows, ctx.max, ctx.sum)
    part = solve_fn(weight[ctx.share(rows)], hessian, *args, shard=shard, **kwargs)
    ctx.agree()
    return solvers.SolveResult(
        weight=ctx.gather_rows(part.weight, rows), mask=ctx.gather_rows(part.mask, rows), loss=part.loss,
        relative_error=part.relative_error, seconds=time.perf_counter() - t0,
    )


def finish(ctx: Context | None) -> None:
    """The last exchange of a pass: no rank leaves while another may still report a failure."""
    if ctx is not None:
        ctx.agree()


def fail(ctx: Context | None, error: BaseException) -> None:
    """This rank failed: tell the others at their next exchange (they raise RankFailure), and say so on the
    error. A RankFailure was already agreed on; a broken process group cannot carry the news."""
    if ctx is None or isinstance(error, RankFailure):
        return
    try:
        everyone = ctx.exchange(error)
    except Exception as comm_error:  # the group itself is broken (a rank died): the original error matters more
        add_note(error, f"mrp_pass: rank {ctx.rank} of {ctx.world} failed and could not tell the other ranks "
                        f"({type(comm_error).__name__}: {comm_error}); they stop at the process group's error or "
                        "timeout")
        return
    others = [r for r, (msg, _) in enumerate(everyone) if msg is not None and r != ctx.rank]
    add_note(error, f"mrp_pass: rank {ctx.rank} of {ctx.world} failed here; the other ranks were told and "
                    "raised too" + (f" (ranks {others} failed as well)" if others else ""))


# ----------------------------------------------------------------------------------------------
# A gloo group of processes on this machine (`mrp prune --nproc N`, commands.spawn_prune).


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local(rank: int, world: int, port: int, threads: int | None = None) -> None:
    """Join a gloo group of `world` processes on this machine (127.0.0.1:port); `threads` torch threads."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if threads:
        torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
