"""Worker processes of tests/test_distributed.py: 2 ranks on CPU with gloo, DDP or FSDP2 (fully_shard)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from fused_ft.testing.specs import OPTIMIZERS

STEPS = 10
BATCH = 8
# registry variant of each optimizer, and what this test changes (LAMB: a clip norm that is active here)
CASES = {"sgd": ("momentum", {}), "adamw": ("default", {}), "lars": ("momentum-wd-trust-clip", {}),
         "lamb": ("default", {"lr": 1e-2, "max_grad_norm": 0.5})}


def build_optimizer(name: str, groups):
    variant, overrides = CASES[name]
    spec = OPTIMIZERS[name]
    return spec.cls(groups, **{**spec.variants[variant], **overrides})


class Net(nn.Module):
    """embed (frozen) -> two hidden layers -> head; odd sizes so shards are uneven."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(12, 30)
        self.body = nn.Sequential(nn.Linear(30, 33), nn.GELU(), nn.Linear(33, 30), nn.GELU())
        self.head = nn.Linear(30, 5)

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


def groups_of(model: nn.Module) -> list[dict]:
    embed = list(model.embed.parameters())
    for p in embed:
        p.requires_grad_(False)
    rest = [p for n, p in model.named_parameters() if not n.startswith("embed.")]
    return [{"params": rest}, {"params": embed, "frozen": True}]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 12, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def train(model, optimizer, steps, rank=0, world=1, start=0) -> None:
    for step in range(start, start + steps):
        x, y = batch(step)
        share = BATCH // world
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n.replace("module.", "")] = p.detach().clone()
    return out


def shard(model: nn.Module) -> nn.Module:
    from fused_ft.harness.distributed import fully_shard  # torch 2.5 has it in torch.distributed._composable.fsdp

    for layer in (model.embed, model.body[0], model.body[2], model.head):
        fully_shard(layer)
    return fully_shard(model)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def trajectories(rank: int, world: int, port: int, wrapper: str, out: str) -> None:
    """Every optimizer for STEPS steps under DDP or FSDP2; rank 0 saves the full parameters."""
    _init(rank, world, port)
    results = {}
    for name in CASES:
        model = Net()
        groups = groups_of(model)
        if wrapper == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
            optimizer = build_optimizer(name, groups)
        else:
            wrapped = shard(model)
            # fully_shard swapped the parameters for DTensors: regroup the new objects
            optimizer = build_optimizer(name, groups_of(wrapped))
        train(wrapped, optimizer, STEPS, rank, world)
        results[name] = full_params(wrapped)
        frozen = [p for g in optimizer.param_groups if g["frozen"] for p in g["params"]]
        results[name + "/frozen_state"] = sum(len(optimizer.state.get(p, {})) for p in frozen)
    if wrapper == "fsdp":
        results["bf16_stochastic_shards"] = _stochastic_shards(world)
    if rank == 0:
        torch.save(results, out)
    _leave()


def _stochastic_shards(world: int) -> list[torch.Tensor]:
    """Every rank's shard of a bf16 weight of ones after one SGD step of half a bf16 ulp below 1.0,
    rounded stochastically: each element moves down with probability 1/2 on its own draw."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from fused_ft import SGD

    mesh = init_device_mesh("cpu", (world,))
    local = torch.ones(32, 16, dtype=torch.bfloat16)
    weight = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False))
    weight.grad = DTensor.from_local(torch.ones_like(local), mesh, [Shard(0)], run_check=False)
    SGD([weight], lr=2.0**-9, bf16_update="stochastic", bf16_seed=0).step()
    shards = [None] * world
    dist.all_gather_object(shards, weight.to_local().clone())
    return shards


def _sharded_run(rank: int, world: int, port: int, name: str):
    """A process group, the sharded Net and its optimizer: what both checkpoint halves start from."""
    _init(rank, world, port)
    model = shard(Net())
    return model, build_optimizer(name, groups_of(model))


def _save_params(model: nn.Module, rank: int, out: str) -> None:
    params = full_params(model)  # a collective: every rank gathers
    if rank == 0:
        torch.save(params, out)
    _leave()


def _leave() -> None:
    # both ranks leave together: a rank that tore down its gloo group while rank 0 was still saving
    # aborted once in CI ("terminate called without an active exception", SIGABRT)
    dist.barrier()
    dist.destroy_process_group()


def checkpoint_save(rank: int, world: int, port: int, name: str, directory: str, out: str) -> None:
    """FSDP2 at this world size: 5 steps, a sharded DCP checkpoint, 5 more steps (saved as the target)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _sharded_run(rank, world, port, name)
    train(model, optimizer, 5, rank, world)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory)
    train(model, optimizer, 5, rank, world, start=5)
    _save_params(model, rank, out)


def checkpoint_load(rank: int, world: int, port: int, name: str, directory: str, out: str) -> None:
    """FSDP2 at another world size: load the checkpoint, continue 5 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer = _sharded_run(rank, world, port, name)
    train(model, optimizer, 1, rank, world, start=0)  # creates the state that the load overwrites
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, optimizer, 5, rank, world, start=5)
    _save_params(model, rank, out)


def _init_as_torchrun(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives each process: fused_ft.harness.finetune joins the group from it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def harness(rank: int, world: int, port: int, runs: dict, data: str, out: str) -> None:
    """fused_ft.harness.finetune runs under torch.distributed; each rank saves every run's parameters as it holds
    them at the last epoch's end (DDP: its own replica; FSDP2: gathered), read where the harness checks
    the ranks, before that check can refuse the run."""
    from fused_ft.harness import finetune as F
    from fused_ft.harness.distributed import unwrap

    _init_as_torchrun(rank, world, port)
    finals, current = {}, [None]
    check = F.check_ranks_agree

    def recording(model, ctx, when):
        finals[current[0]] = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                              for n, p in unwrap(model).named_parameters()}
        check(model, ctx, when)

    F.check_ranks_agree = recording
    for name, settings in runs.items():
        current[0] = name
        F.finetune(F.FinetuneConfig(model="vit_tiny_patch16_224", data=data, lr=0.01, epochs=2, batch_size=8,
                                    image_size=32, out=f"{out}/{name}", progress=False, **settings))
    torch.save(finals, f"{out}/rank{rank}.pt")
    _leave()


def drift(rank: int, world: int, port: int, out: str) -> None:
    """check_ranks_agree on replicas that differ in one parameter on rank 1: what each rank raises."""
    from fused_ft.harness.distributed import Context, DistributedDrift, check_ranks_agree

    _init(rank, world, port)
    model = Net()
    if rank == 1:
        with torch.no_grad():
            model.body[2].bias[3] += 1e-6
    try:
        check_ranks_agree(model, Context(rank, world), "after epoch 2")
        message = None
    except DistributedDrift as exc:
        message = str(exc)
    messages = [None] * world
    dist.all_gather_object(messages, message)
    if rank == 0:
        torch.save(messages, out)
    _leave()
