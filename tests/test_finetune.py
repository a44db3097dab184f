"""Accuracy harness: finetune end to end, kill-and-resume, sweep selection, data errors, shift-lab."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fused_ft import cli
from fused_ft.harness import sweep
from fused_ft.harness.data import DataError, load_data, shift_lab


def _finetune_args(root, out, epochs=3, extra=()):
    return ["finetune", "--model", "vit_tiny_patch16_224", "--image-size", "32", "--data", f"imagefolder:{root}",
            "--method", "sgd-freeze-embed", "--lr", "0.01", "--epochs", str(epochs), "--batch-size", "8",
            "--out", str(out), *extra]


def test_finetune_end_to_end(image_folder, tmp_path, capsys):
    assert cli.main(_finetune_args(image_folder, tmp_path / "run")) == 0
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(result) >= {"id_val", "id_test", "ood_test", "ood_test_b", "best_epoch", "lr"}
    assert all(0 <= result[k] <= 1 for k in ("id_val", "id_test", "ood_test", "ood_test_b"))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["config", "epoch", "epoch", "epoch", "result"]
    assert lines[-1]["id_val"] == max(x["id_val"] for x in lines if x["event"] == "epoch")  # early stopping
    # cosine to 0 over all 9 steps (24 images, batch 8, 3 epochs): the LR each epoch starts with
    cosine = [0.01 * 0.5 * (1 + math.cos(math.pi * s / 9)) for s in (0, 3, 6)]
    assert [x["lr"] for x in lines[1:4]] == pytest.approx(cosine)
    assert '"ood_test_b"' in capsys.readouterr().out
    assert cli.main(_finetune_args(image_folder, tmp_path / "run")) == 2  # refuses to overwrite without --resume
    # a finished run reused with other settings, or from a damaged checkpoint: one line, nothing changed
    # (each also as a dry run, which must refuse the same, in the same line, and write nothing)
    files = {f: f.read_bytes() for f in (tmp_path / "run").iterdir()}
    capsys.readouterr()
    assert cli.main(_finetune_args(image_folder, tmp_path / "run", extra=["--resume", "--dry-run"])) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"  out     {tmp_path / 'run'}: finished (its results are " \
        "read back, nothing is redone)"
    for dry in ([], ["--dry-run"]):
        assert cli.main(_finetune_args(image_folder, tmp_path / "run", extra=["--resume", "--seed", "1", *dry])) == 2
        assert "started with other settings (seed 0 -> 1)" in capsys.readouterr().err
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.write_bytes(files[checkpoint][: len(files[checkpoint]) // 2])
    for dry in ([], ["--dry-run"]):
        assert cli.main(_finetune_args(image_folder, tmp_path / "run", extra=["--resume", *dry])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "checkpoint.pt is damaged or missing" in err[0], err
    (tmp_path / "run" / "results.json").unlink()  # an unfinished run: the checkpoint itself is read
    for dry in (["--dry-run"], []):
        assert cli.main(_finetune_args(image_folder, tmp_path / "run", extra=["--resume", *dry])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "checkpoint.pt is damaged:" in err[0] and "delete it to start over" in err[0], err


def test_killed_run_resumes_to_the_same_result(image_folder, tmp_path, capsys):
    args = _finetune_args(image_folder, tmp_path / "killed", epochs=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fused_ft.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count('"event": "epoch"') >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "results.json").exists()
    files = {f: f.read_bytes() for f in (tmp_path / "killed").iterdir()}
    changed_lr = [a if a != "0.01" else "0.02" for a in args]
    assert cli.main(changed_lr + ["--resume"]) == 2  # it would continue the old schedule and record the new lr
    assert cli.main(changed_lr + ["--resume", "--dry-run"]) == 2
    done = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["state"]["epoch"]
    capsys.readouterr()
    assert cli.main(args + ["--resume", "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[-1] == f"  out     {tmp_path / 'killed'}: resumes from epoch {done} of 4"
    assert {f: f.read_bytes() for f in (tmp_path / "killed").iterdir()} == files
    assert cli.main(args + ["--resume"]) == 0
    assert cli.main(_finetune_args(image_folder, tmp_path / "straight", epochs=4)) == 0
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert resumed == straight
    epochs = [json.loads(x)["epoch"] for x in log.read_text().splitlines() if '"event": "epoch"' in x]
    assert epochs == [1, 2, 3, 4]


def test_missing_or_malformed_data_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    rc = cli.main(_finetune_args(tmp_path, tmp_path / "out"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "missing id_val, id_test, ood_test*" in err and "DIR/train/<class>" in err
    with pytest.raises(DataError, match=r"no metadata.csv; expected DIR/metadata.csv"):
        load_data(f"waterbirds:{tmp_path}")
    with pytest.raises(DataError, match=r"Invalid data: 'cifar:x'"):
        load_data("cifar:x")


def test_an_unreadable_image_stops_the_run_before_training_naming_the_file(image_folder, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    (root / "id_test" / "bright" / "1.png").write_bytes(b"not a png")
    assert cli.main(_finetune_args(root, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read the image" in err[0] and "id_test/bright/1.png" in err[0], err
    assert not (tmp_path / "out").exists()  # the landed code left a config-only metrics.jsonl
    assert cli.main(_finetune_args(root, tmp_path / "out", extra=["--dry-run"])) == 2  # the check a dry run is for
    assert "id_test/bright/1.png" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sweep_picks_the_lr_by_id_val_and_reports_90_percent_intervals():
    results = [dict(method="sgd", lr=lr, seed=s, id_val=v, id_test=t, ood_test=o)
               for lr, vals in [(0.1, [(0.5, 0.5, 0.3), (0.6, 0.5, 0.3)]), (0.01, [(0.8, 0.7, 0.4), (0.7, 0.9, 0.6)])]
               for s, (v, t, o) in enumerate(vals)]
    (row,) = sweep.summarize(results)
    assert row["lr"] == 0.01 and row["lr_at_grid_edge"]
    assert row["id_test"] == pytest.approx(80.0)
    # two seeds: t(0.95, 1) = 6.314; half-width = t * sd / sqrt(2)
    assert row["ood_test_ci90"] == pytest.approx(6.314 * math.sqrt(200) / math.sqrt(2))
    assert "80.0 ± 63.1" in sweep.render_sweep_table([row])
    with pytest.raises(ValueError, match=r"Invalid lr-sweep: 'fast'"):
        sweep.lr_grid("sgd", "fast")
    assert sweep.lr_grid("adamw", "paper", 30) == (9e-6, 3e-5, 9e-5, 3e-4, 9e-4, 3e-3)
    with pytest.raises(ValueError, match=r"Invalid lr multiplier: 0"):
        sweep.lr_grid("sgd", "paper", 0)


def test_sweep_cli_end_to_end(image_folder, tmp_path, capsys):
    rc = cli.main(["sweep", "--model", "vit_tiny_patch16_224", "--image-size", "32", "--data", str(image_folder),
                   "--methods", "sgd,adamw", "--lr-sweep", "0.01,0.001", "--seeds", "0,1", "--epochs", "1",
                   "--batch-size", "8", "--jobs", "1", "--out", str(tmp_path), "--format", "md",
                   "--plot", str(tmp_path / "sweep.png")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "layer-gradient verdict at initialisation" in out and "| sgd |" in out and "| adamw |" in out
    # the verdict of the runs' own heads (seeds 0 and 1) on the training images (24: 3 minibatches of 8)
    verdict = json.loads((tmp_path / "summary.json").read_text())["verdict"]
    assert (verdict["head_seeds"], verdict["batches"]) == (2, 3) and verdict["text"] in out
    assert verdict["low"] <= verdict["embedding_ratio"] <= verdict["high"] and verdict["level"] == 0.95
    runs = list(tmp_path.glob("*/lr*/seed*/results.json"))
    assert len(runs) == 8
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_shift_lab_splits_and_pretraining_cache(tmp_path, monkeypatch):
    a = shift_lab.make_splits("style", shift_lab.ShiftLabConfig(train=64, id_val=16, id_test=16, ood_test=16))
    b = shift_lab.make_splits("style", shift_lab.ShiftLabConfig(train=64, id_val=16, id_test=16, ood_test=16))
    assert torch.equal(a["train"][0], b["train"][0]) and a["train"][0].shape == (64, 3, 32, 32)
    assert set(a["ood_test"][1].tolist()) <= set(range(len(shift_lab.TARGET_SHAPES)))
    # ID images are filled on dark backgrounds, OOD ones outlines on light backgrounds
    assert a["id_test"][0].mean() < 0.4 < a["ood_test"][0].mean()
    spurious = shift_lab.make_splits("spurious", shift_lab.ShiftLabConfig(train=400, id_val=8, id_test=8, ood_test=400))

    def hue_agreement(images, labels):  # the corner pixel shows the background hue
        hue = torch.cdist(images[:, :, 0, 0], shift_lab.HUES).argmin(1)
        return (hue == labels).float().mean()

    assert hue_agreement(*spurious["train"]) > 0.85 and hue_agreement(*spurious["ood_test"]) < 0.45
    monkeypatch.setenv("FUSED_FT_CACHE", str(tmp_path))
    recipe = shift_lab.PretrainRecipe(examples=64, epochs=1, batch_size=32)
    first = shift_lab.create_pretrained("shift-lab-vit", 4, recipe=recipe, progress=False)
    assert len(list((tmp_path / "shift-lab").glob("shift-lab-vit-adamw-*.pt"))) == 1
    second = shift_lab.create_pretrained("shift-lab-vit", 4, recipe=recipe, progress=False)
    for (n, p), q in zip(first.named_parameters(), second.parameters()):
        if not n.startswith("head"):
            assert torch.equal(p, q), n
    with pytest.raises(ValueError, match=r"Invalid shift-lab variant: 'x'"):
        shift_lab.make_splits("x")


def test_gradual_unfreeze_run_uses_its_own_schedule(image_folder, tmp_path):
    args = _finetune_args(image_folder, tmp_path / "gu")
    args[args.index("sgd-freeze-embed")] = "gradual-unfreeze"
    assert cli.main(args) == 0
    lines = [json.loads(x) for x in (tmp_path / "gu" / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["lr"] for x in lines if x["event"] == "epoch"]
    assert lrs == pytest.approx([0.01 * math.exp(3.73 * (1 - t / 2)) for t in range(3)])


@pytest.mark.parametrize("args,message", [
    (["--seeds", "a"], r"argument --seeds: must be comma-separated integers, got 'a'"),
    (["--jobs", "0"], r"argument --jobs: must be an int >= 1, got '0'"),
])
def test_sweep_refuses_bad_counts_naming_the_option(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", *args])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_sweep_finding_says_what_the_intervals_and_grids_show():
    def row(method, ood, ci, edge=False):
        return {"method": method, "lr": 0.01, "seeds": 2, "lr_at_grid_edge": edge, "ood_test": ood,
                "ood_test_ci90": ci}

    tied = sweep.finding([row("sgd", 30.0, 1.0), row("adamw", 29.5, 0.2, edge=True), row("lars", 20.0, 1.0)])
    assert tied.startswith("sgd has the best ood test accuracy (30.0 ± 1.0, 2 seeds)")
    assert "the 90% intervals of adamw overlap it" in tied and "lars" not in tied.split(";")[0]
    assert "the best lr of adamw sits at its grid's edge" in tied
    clear = sweep.finding([row("sgd", 30.0, 1.0), row("adamw", 25.0, 1.0)])
    assert "clear of every other method's 90% interval" in clear and "lies inside its grid" in clear


def test_parameters_that_should_train_but_got_no_gradient_are_named_once():
    """Reentrant gradient checkpointing under a frozen stem: the checkpointed blocks see inputs without
    requires_grad, so their weights get no gradient and would keep their pretrained values silently."""
    import warnings

    import fused_ft
    from fused_ft.harness.finetune import warn_missing_gradients
    from torch.utils.checkpoint import checkpoint

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.head(checkpoint(self.block, self.stem(x), use_reentrant=True))

    net = Net()
    net.stem.requires_grad_(False)
    optimizer = fused_ft.SGD([{"params": [*net.block.parameters(), *net.head.parameters()]},
                              {"params": list(net.stem.parameters()), "frozen": True}], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own note about inputs without requires_grad
        net(torch.randn(3, 4)).sum().backward()
    with pytest.warns(UserWarning, match=r"2 of 4 parameters that should train got no gradient in the first step "
                                         r"\(first: block.weight\).*reentrant gradient checkpointing"):
        warn_missing_gradients(net, optimizer)
    net.zero_grad()
    net.head(net.block(net.stem(torch.randn(3, 4)))).sum().backward()  # without checkpointing: all train
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_missing_gradients(net, optimizer)


class _Planted:
    """Unpickling this creates a directory: what a planted checkpoint.pt could do with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("content,message", [
    ("planted", "is not a checkpoint fused-ft wrote: it holds objects other than tensors and plain values"),
    ("no-state", "is not a fused-ft finetune checkpoint (no 'optimizer')"),
    ("list", "is not a fused-ft finetune checkpoint (it holds a list, not a dict)"),
    ("bad-epoch", "is not a fused-ft finetune checkpoint ('epoch' is a str, not a int)"),
])
def test_resume_reads_no_code_and_refuses_a_foreign_checkpoint_in_one_line(image_folder, tmp_path, capsys, content,
                                                                            message):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "code-ran"
    checkpoint = run / "checkpoint.pt"
    good_state = {"epoch": 1, "best_val": 0.5, "best_epoch": 0, "history": [], "best_model": None}
    torch.save({"planted": {"model": {}, "state": _Planted(marker)},
                "no-state": {"model": {}},
                "list": [1, 2],
                "bad-epoch": {"model": {}, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
                              "torch_rng": torch.get_rng_state(), "python_rng": (3, (1,), None),
                              "state": {**good_state, "epoch": "1"}, "settings": {}}}[content], checkpoint)
    before = checkpoint.read_bytes()
    for dry in (["--dry-run"], []):
        assert cli.main(_finetune_args(image_folder, run, extra=["--resume", *dry])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not marker.exists()  # nothing in the file ran
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"] and checkpoint.read_bytes() == before
