"""Scale-out: 2 CPU processes with gloo under DDP and FSDP2 match one process on the full batch,
and a sharded checkpoint saved at world size 2 loads at world size 1 and continues identically."""
from __future__ import annotations

import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from fused_ft.harness.distributed import FSDP_NEEDS_CUDA, fsdp_runs_here
from tests import dist_worker as W

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
# torch 2.5 (the oldest supported) runs FSDP2 only with CUDA; make compat runs these files under it
FSDP_HERE = fsdp_runs_here()
needs_fsdp = pytest.mark.skipif(not FSDP_HERE, reason=f"torch {torch.__version__}'s FSDP2 needs CUDA (CPU from 2.6)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process(name: str, steps: int = W.STEPS) -> dict[str, torch.Tensor]:
    model = W.Net()
    optimizer = W.build_optimizer(name, W.groups_of(model))
    W.train(model, optimizer, steps)
    return W.full_params(model)


@pytest.mark.parametrize("wrapper", ["ddp", pytest.param("fsdp", marks=needs_fsdp)])
def test_two_ranks_match_one_process_on_the_full_batch(wrapper, tmp_path):
    out = tmp_path / "params.pt"
    mp.spawn(W.trajectories, args=(2, _port(), wrapper, str(out)), nprocs=2, join=True)
    results = torch.load(out)
    initial = W.full_params(W.Net())
    for name in W.CASES:
        expected = _single_process(name)
        for key, value in expected.items():
            torch.testing.assert_close(results[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{wrapper} {name} {key}")
            if key.startswith("embed."):  # the frozen group stayed put
                assert torch.equal(results[name][key], initial[key])
        assert results[name + "/frozen_state"] == 0
    if wrapper == "fsdp":  # shards numbered their elements from 0 and drew the same bits on every rank
        first, second = results["bf16_stochastic_shards"]
        for shard in (first, second):
            assert set(shard.unique().tolist()) == {1.0, 1.0 - 2.0**-8}
            assert 0.4 < (shard < 1).float().mean() < 0.6
        assert not torch.equal(first, second)


@needs_fsdp
@pytest.mark.parametrize("name", ["sgd", "lamb"])
def test_sharded_checkpoint_from_world_2_continues_at_world_1(name, tmp_path):
    ckpt, target, resumed = tmp_path / "ckpt", tmp_path / "target.pt", tmp_path / "resumed.pt"
    mp.spawn(W.checkpoint_save, args=(2, _port(), name, str(ckpt), str(target)), nprocs=2, join=True)
    mp.spawn(W.checkpoint_load, args=(1, _port(), name, str(ckpt), str(resumed)), nprocs=1, join=True)
    target, resumed = torch.load(target), torch.load(resumed)
    for key in target:
        torch.testing.assert_close(resumed[key], target[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_finetune_under_torchrun(image_folder, tmp_path, fsdp):
    import json
    import os
    import shutil
    import subprocess
    import sys

    from fused_ft.harness.data import load_data
    from fused_ft.harness.finetune import evaluate
    from fused_ft.vision.models import create_model

    out = tmp_path / "run"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(_port()), "-m", "fused_ft.cli", "finetune",
           "--model", "vit_tiny_patch16_224", "--image-size", "32", "--data", f"imagefolder:{image_folder}",
           "--method", "sgd-freeze-embed", "--lr", "0.01", "--epochs", "2", "--batch-size", "8", "--out", str(out)]
    proc = subprocess.run(cmd + (["--fsdp"] if fsdp else []), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0 and "(SIGSEGV)" in proc.stderr:
        # Seen once in about 20 runs of the FSDP2 case, only inside the full suite on 2 busy cores (2026-12-04):
        # rank 0 died of a segmentation fault with no Python traceback, inside torch (gloo/FSDP2 on CPU), and
        # rank 1 then lost its connection. A rerun in a fresh directory on a fresh port tells that native crash
        # from a failure of ours, which fails both runs; the crash is reported as a warning, not hidden.
        warnings.warn(f"torchrun rank crashed (SIGSEGV), rerunning once: {proc.stderr[-600:]}", RuntimeWarning)
        shutil.rmtree(out, ignore_errors=True)
        cmd[cmd.index("--master-port") + 1] = str(_port())
        proc = subprocess.run(cmd + (["--fsdp"] if fsdp else []), capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if fsdp and not FSDP_HERE:  # torch 2.5 on CPU: refused before any work, naming the fix
        assert proc.returncode != 0 and FSDP_NEEDS_CUDA.format(torch.__version__) in proc.stderr, proc.stderr[-3000:]
        assert not (out / "results.json").exists()
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["world_size"] == 2
    assert proc.stdout.count('"id_test"') == 1  # rank 0 prints, rank 1 does not
    # the metrics gathered over both ranks equal one process evaluating the saved best weights
    model = create_model("vit_tiny_patch16_224", 2, image_size=32)
    model.load_state_dict(torch.load(out / "best_model.pt"))
    data = load_data(f"imagefolder:{image_folder}", image_size=32)
    assert result["id_test"] == evaluate(model, data.id_test, 8, torch.device("cpu"))
    assert result["ood_test_b"] == evaluate(model, data.ood_tests["ood_test_b"], 8, torch.device("cpu"))


# Runs whose trainable set changes (gradual unfreezing) or is set by a stage (LP-FT's second), under DDP and
# FSDP2: the ranks must end equal, and the layers unfrozen mid-run must have trained.
HARNESS_RUNS = {
    "gradual-ddp": dict(method="gradual-unfreeze"),
    "gradual-fsdp": dict(method="gradual-unfreeze", fsdp=True),
    "lpft-ddp": dict(method="sgd-freeze-embed", after_linear_probe=True),
    "lpft-fsdp": dict(method="sgd-freeze-embed", after_linear_probe=True, fsdp=True),
}


def test_harness_ranks_stay_equal_when_the_trainable_set_changes(image_folder, tmp_path):
    """Was: gradual-unfreeze under DDP ended with 30 parameter tensors different on rank 0 and rank 1
    (DDP averages only what required a gradient when it was built) and nothing in the output showed it."""
    from fused_ft.vision.models import create_model

    runs = {name: run for name, run in HARNESS_RUNS.items() if FSDP_HERE or not run.get("fsdp")}
    mp.spawn(W.harness, args=(2, _port(), runs, f"imagefolder:{image_folder}", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in runs:
        for key, value in ranks[0][name].items():
            assert torch.equal(value, ranks[1][name][key]), f"{name}: {key} differs between the ranks"
    torch.manual_seed(0)  # finetune's seed rule: the model is built right after seeding with config.seed
    initial = dict(create_model("vit_tiny_patch16_224", 2, image_size=32).named_parameters())
    gradual_ddp = ranks[0]["gradual-ddp"]
    # cls_token and blocks.5: frozen in the first of the two epochs. (Randomly initialised at 32 px, the
    # lower layers get gradients of ~1e-13, so they move by that much: exactly unequal, but far below any tolerance.)
    for key in ("cls_token", "blocks.5.attn.qkv.weight"):
        assert not torch.equal(gradual_ddp[key], initial[key]), f"{key} never trained under DDP"
    if not FSDP_HERE:
        return
    gradual_fsdp = ranks[0]["gradual-fsdp"]
    for key in ("cls_token", "blocks.5.attn.qkv.weight"):
        assert not torch.equal(gradual_fsdp[key], initial[key]), f"{key} never trained under FSDP2"
    for key, value in gradual_ddp.items():  # the same data order and averaged gradients: the same run
        torch.testing.assert_close(gradual_fsdp[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for key, value in ranks[0]["lpft-ddp"].items():  # LP-FT's second stage: the embedding stays, the rest agrees
        if key.startswith("patch_embed."):
            assert torch.equal(value, initial[key]) and torch.equal(ranks[0]["lpft-fsdp"][key], initial[key])
        torch.testing.assert_close(ranks[0]["lpft-fsdp"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_ranks_that_disagree_are_refused_on_every_rank_naming_the_parameter(tmp_path):
    out = tmp_path / "messages.pt"
    mp.spawn(W.drift, args=(2, _port(), str(out)), nprocs=2, join=True)
    messages = torch.load(out)
    assert messages[0] == messages[1]
    assert messages[0].startswith("ranks 0 and 1 hold different values of body.2.bias (shape (30,)) after epoch 2")
