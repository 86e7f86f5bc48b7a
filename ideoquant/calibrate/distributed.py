"""Reducing calibration statistics across torchrun processes."""

from __future__ import annotations

import math
import os

import torch

from .statistics import SAMPLE_DTYPE, LinearStatistics


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed under torchrun when it is not yet."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_statistics(stats: dict[str, dict[str, LinearStatistics]], energies: dict[str, dict[str, torch.Tensor]],
                       max_samples: int) -> None:
    """Combine every rank's statistics in place (max, sums, bottom-k samples)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for branch in sorted(energies):
        for block in sorted(energies[branch]):
            total = energies[branch][block].to(comm)
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            energies[branch][block] = total.to(energies[branch][block].device)
    for branch in sorted(stats):
        for module in sorted(stats[branch]):
            s = stats[branch][module]
            absmax, sumsq, bin_absmax = s.absmax.to(comm), s.sumsq.to(comm), s.bin_absmax.to(comm)
            counts = torch.cat([torch.tensor([s.count]), s.bin_count.cpu()]).to(comm)
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX)
            dist.all_reduce(bin_absmax, op=dist.ReduceOp.MAX)
            dist.all_reduce(sumsq, op=dist.ReduceOp.SUM)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            keys = torch.full((max_samples,), math.inf, dtype=torch.float64)
            rows = torch.zeros((max_samples, s.in_features), dtype=torch.float32)
            keys[: len(s.sample_keys)] = s.sample_keys
            rows[: len(s.sample_keys)] = s.samples.to(torch.float32)
            all_keys = [torch.empty_like(keys, device=comm) for _ in range(world)]
            all_rows = [torch.empty_like(rows, device=comm) for _ in range(world)]
            dist.all_gather(all_keys, keys.to(comm))
            dist.all_gather(all_rows, rows.to(comm))
            gathered_keys = torch.cat(all_keys).cpu()
            gathered_rows = torch.cat(all_rows).cpu().to(SAMPLE_DTYPE)
            real = torch.isfinite(gathered_keys)
            s.absmax = absmax.to(s.absmax.device)
            s.sumsq = sumsq.to(s.sumsq.device)
            s.bin_absmax = bin_absmax.to(s.bin_absmax.device)
            counts = counts.cpu()
            s.count = int(counts[0])
            s.bin_count = counts[1:].to(s.bin_count.device)
            s._keep_smallest(gathered_keys[real], gathered_rows[real], max_samples)
