"""What keeping DDP ranks equal costs when the trainable set changes: ``python -m benchmarks.ddp_unfreeze``.

DDP averages the gradients of the parameters that required a gradient when it was built. Two ways to
keep ranks equal under gradual unfreezing (fused_ft.harness.distributed.follow_trainable_set):

- ``register all``: build DDP once with every parameter requiring a gradient, then freeze; DDP then
  needs ``find_unused_parameters=True`` (frozen parameters get no gradient), which walks the autograd
  graph after every forward and all-reduces the frozen parameters' buckets too (zeros);
- ``re-wrap``: build a new DDP whenever the trainable set changes (a few times per run); steps run as
  plain DDP over the trainable parameters.

Two gloo ranks on the CPU, ``vit_tiny_patch16_224`` at 64 px, batch 8 a rank, a third of the layers
trainable (gradual unfreezing's first epoch). Reported: median step time of each way over interleaved
rounds, and the time one re-wrap takes (its broadcast of the module from rank 0 included).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _model() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)


def _freeze_lower_two_thirds(model: nn.Module) -> None:
    blocks = len(model.blocks)
    for name, p in model.named_parameters():
        top = name.startswith(("head", "norm.")) or (name.startswith("blocks.")
                                                    and int(name.split(".")[1]) >= blocks * 2 // 3)
        p.requires_grad_(top)


def _steps(ddp: nn.Module, steps: int) -> float:
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    start = time.perf_counter()
    for _ in range(steps):
        ddp.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ddp(x), y).backward()
    dist.barrier()
    return (time.perf_counter() - start) / steps * 1e3


def _worker(rank: int, world: int, port: int, rounds: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    register_all = _model()
    all_ddp = nn.parallel.DistributedDataParallel(register_all, find_unused_parameters=True)
    _freeze_lower_two_thirds(register_all)
    rewrapped = _model()
    _freeze_lower_two_thirds(rewrapped)
    times = {"register all (find_unused_parameters=True)": [], "re-wrap (plain DDP)": [], "one re-wrap": []}
    for _ in range(rounds):
        times["register all (find_unused_parameters=True)"].append(_steps(all_ddp, steps))
        start = time.perf_counter()
        plain = nn.parallel.DistributedDataParallel(rewrapped)
        dist.barrier()
        times["one re-wrap"].append((time.perf_counter() - start) * 1e3)
        times["re-wrap (plain DDP)"].append(_steps(plain, steps))
        del plain
    if rank == 0:
        torch.save({k: statistics.median(v) for k, v in times.items()}, out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/ddp_unfreeze_{os.getpid()}.pt"
    mp.spawn(_worker, args=(2, port, args.rounds, args.steps, out), nprocs=2, join=True)
    results = torch.load(out)
    os.remove(out)
    print(f"`python -m benchmarks.ddp_unfreeze --rounds {args.rounds} --steps {args.steps}` (2 gloo ranks, "
          "vit_tiny at 64 px, a third of the layers trainable), medians:\n")
    print("| way | ms |\n|---|---:|")
    for name, ms in results.items():
        print(f"| {name}{' per step' if 'one' not in name else ''} | {ms:.1f} |")


if __name__ == "__main__":
    main()
