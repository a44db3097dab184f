"""Layer-gradient diagnostics: Eq. 3.1 against a hand computation (noise, shift-lab, an ImageFolder), the
verdict and its interval, the CLI."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from fused_ft import cli
from fused_ft.harness.diagnostics import LayerGradNorm, layer_grad_norms, verdict


class LinearChain(nn.Module):
    """x -> embed -> block -> head, all linear without bias, so every gradient has a closed form."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 6, bias=False)
        self.block = nn.Linear(6, 5, bias=False)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.head(self.block(self.embed(x)))


def _squared_error(out, y):
    return 0.5 * (out - y).pow(2).sum()


def test_layer_grad_norms_match_hand_computation():
    model = LinearChain()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(7, 4, generator=g), torch.randn(7, 3, generator=g)) for _ in range(3)]
    rows = layer_grad_norms(model, data, _squared_error, names=["embed"])
    W1, W2, W3 = (m.weight.detach().double() for m in (model.embed, model.block, model.head))
    expected = {"embedding": [], "block": [], "head": []}
    for x, y in data:
        x, y = x.double(), y.double()
        h1 = x @ W1.T
        h2 = h1 @ W2.T
        r = h2 @ W3.T - y  # dL/dout for L = 0.5 ||out - y||^2
        expected["head"].append(torch.linalg.norm(r.T @ h2))
        expected["block"].append(torch.linalg.norm((r @ W3).T @ h1))
        expected["embedding"].append(torch.linalg.norm((r @ W3 @ W2).T @ x))
    by_name = {r.layer: r for r in rows}
    assert [r.role for r in rows] == ["embedding", "middle", "head"]
    for name, weight in (("embedding", W1), ("block", W2), ("head", W3)):
        G = float(torch.stack(expected[name]).mean())
        row = by_name[name]
        assert row.grad_norm == pytest.approx(G, rel=1e-5)
        assert row.param_norm == pytest.approx(float(torch.linalg.norm(weight)), rel=1e-6)
        assert row.grad_over_param_norm == pytest.approx(G / float(torch.linalg.norm(weight)), rel=1e-5)
        assert row.grad_over_sqrt_params == pytest.approx(G / math.sqrt(weight.numel()), rel=1e-5)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # left as found


def test_frozen_params_are_measured_and_restored():
    model = LinearChain()
    model.embed.weight.requires_grad_(False)
    rows = layer_grad_norms(model, [(torch.randn(2, 4), torch.randn(2, 3))], _squared_error, names=["embed"])
    assert rows[0].grad_norm > 0 and not model.embed.weight.requires_grad


def _row(role, g, i=0):
    return LayerGradNorm(i, f"l{i}", role, 10, g, 1.0, g, g / math.sqrt(10))


def test_verdict_threshold():
    middle = [_row("middle", v, i) for i, v in enumerate([1.0, 2.0, 3.0], start=1)]
    assert verdict([_row("embedding", 6.0)] + middle).recommend_freeze_embed  # 6 / median 2 = 3x
    v = verdict([_row("embedding", 5.9)] + middle)
    assert not v.recommend_freeze_embed and v.embedding_ratio == pytest.approx(2.95)
    assert "not needed" in str(v) and "2.95x" in str(v) and "no interval: 1 head seed x 1 minibatch;" in str(v)
    with pytest.raises(ValueError, match="Invalid rows"):
        verdict(middle)


def test_minibatches_are_full_a_short_dataset_is_said_and_a_mistyped_spec_names_the_kinds():
    from torch.utils.data import TensorDataset

    from fused_ft.harness.data import DataError, load_data
    from fused_ft.harness.diagnostics import sample_batches

    data = TensorDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.long))
    with pytest.warns(UserWarning, match="4 minibatches of 4 were asked for, the data holds 10 images: measuring 2"):
        batches = sample_batches(data, 4, 4)
    assert [len(x) for x, _ in batches] == [4, 4]  # no short third minibatch of 2
    with pytest.raises(ValueError, match=r"Invalid batch_size: 11 \(the data holds 10 images, not one full"):
        sample_batches(data, 11, 1)
    with pytest.raises(DataError, match=r"Invalid data: 'shiftlab' is neither a SPEC nor a folder \(kinds: shift-lab"):
        load_data("shiftlab")


def _runs(embedding, middle):
    """Rows of several head seeds: ``embedding[s][b]`` and ``middle[k][s][b]`` are ||g|| per minibatch."""
    return [[LayerGradNorm(0, "embedding", "embedding", 10, 0.0, 1.0, 0.0, 0.0, tuple(embedding[s]), s)]
            + [LayerGradNorm(k + 1, f"b{k}", "middle", 10, 0.0, 1.0, 0.0, 0.0, tuple(m[s]), s)
               for k, m in enumerate(middle)]
            for s in range(len(embedding))]


def test_verdict_interval_is_a_crossed_bootstrap_and_decides_only_when_clear_of_the_threshold():
    # two head seeds x two minibatches; one middle layer, so the median is that layer
    runs = _runs(embedding=[[4.0, 6.0], [2.0, 4.0]], middle=[[[1.0, 1.0], [1.0, 1.0]]])
    v = verdict(runs, resamples=4000)
    assert v.embedding_ratio == pytest.approx(4.0) and (v.head_seeds, v.batches) == (2, 2)
    # every draw averages 4 cells of {4, 6, 2, 4} chosen by seed and minibatch counts: the extremes
    # (both draws of seed 1, minibatch 0 -> 2.0; seed 0, minibatch 1 -> 6.0) each have probability 1/16
    assert v.low == pytest.approx(2.0) and v.high == pytest.approx(6.0)
    assert v.decision == "not separable" and not v.recommend_freeze_embed
    assert "not separable: the interval straddles 3x" in str(v) and "95% interval 2.00-6.00x" in str(v)
    clear = verdict(_runs([[4.0, 6.0], [5.0, 4.0]], [[[1.0, 1.0], [1.0, 1.0]]]))
    assert clear.decision == "recommended" and clear.low >= 3.0 and "CLIP ViT-B/16 on DomainNet" in str(clear)
    below = verdict(_runs([[1.0, 2.0], [1.5, 1.0]], [[[1.0, 1.0], [1.0, 1.0]]]))
    assert below.decision == "not needed" and below.high < 3.0
    assert verdict(runs, data="noise").recommend_freeze_embed is False
    assert "smoke test of the model, not advice about any data" in str(verdict(runs, data="noise"))
    with pytest.raises(ValueError, match="different numbers of minibatches"):
        verdict([runs[0], [r.__class__(**{**r.__dict__, "batch_grad_norms": (1.0,)}) for r in runs[1]]])


def test_grad_norms_cli_on_noise_is_a_smoke_test_equal_to_the_api(tmp_path, capsys):
    rc = cli.main(["grad-norms", "--model", "vit_tiny_patch16_224", "--image-size", "32", "--num-classes", "5",
                   "--batches", "2", "--batch-size", "4", "--head-seeds", "2", "--seed", "3", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("verdict: embedding gradient norm =") and out[-1].endswith(
        "measured on noise images, a smoke test of the model, not advice about any data")
    with (tmp_path / "grad_norms.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["head_seed"] for r in rows] == ["3"] * 15 + ["4"] * 15
    assert rows[0]["role"] == "embedding" and rows[0]["layer"] == "embedding" and rows[14]["role"] == "head"
    assert [r["layer"] for r in rows[1:13]] == [f"blocks.{i}" for i in range(12)]
    # the same numbers as the Python API on the same seeded model and noise batches
    from fused_ft.vision.models import create_model

    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)) for _ in range(2)]
    for seed, measured in ((3, rows[:15]), (4, rows[15:])):
        torch.manual_seed(seed)
        api = layer_grad_norms(create_model("vit_tiny_patch16_224", 5, image_size=32), data)
        assert [float(r["grad_norm"]) for r in measured] == pytest.approx([r.grad_norm for r in api], rel=1e-6)
    saved = json.loads((tmp_path / "verdict.json").read_text())
    assert saved["data"] == "noise" and saved["head_seeds"] == 2 and saved["batches"] == 2
    assert saved["low"] <= saved["embedding_ratio"] <= saved["high"] and not saved["recommend_freeze_embed"]
    png = (tmp_path / "grad_norms.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def _by_hand(model, batches, layers):
    """Eq. 3.1 written out: per minibatch, cross-entropy's gradient of each layer's parameters (named by
    prefix), its 2-norm in float64; then the mean over minibatches."""
    named = dict(model.named_parameters())
    norms = {layer: [] for layer in layers}
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        for layer, prefixes in layers.items():
            params = [p for n, p in named.items() if n.startswith(prefixes)]
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            norms[layer].append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)))
    return norms


def _check_rows_against_hand(rows, expected_by_seed):
    for seed, expected in expected_by_seed.items():
        measured = {r["layer"]: r for r in rows if int(r["head_seed"]) == seed}
        for layer, norms in expected.items():
            batch = [float(x) for x in measured[layer]["batch_grad_norms"].split()]
            assert batch == pytest.approx(norms, rel=1e-5), (seed, layer)
            assert float(measured[layer]["grad_norm"]) == pytest.approx(sum(norms) / len(norms), rel=1e-5)


VIT_LAYERS = {"embedding": ("patch_embed.",), **{f"blocks.{i}": (f"blocks.{i}.",) for i in range(4)},
              "head": ("head.",)}


def test_grad_norms_on_shift_lab_equal_eq_3_1_by_hand_with_the_runs_heads(tmp_path, monkeypatch, capsys):
    import functools

    from fused_ft.harness.data import load_data, shift_lab

    monkeypatch.setenv("FUSED_FT_CACHE", str(tmp_path / "cache"))  # a tiny pretraining: the path, not the model
    monkeypatch.setattr(shift_lab, "PretrainRecipe",
                        functools.partial(shift_lab.PretrainRecipe, examples=64, epochs=1, batch_size=32))
    rc = cli.main(["grad-norms", "--model", "shift-lab-vit", "--data", "shift-lab", "--batches", "3", "--batch-size",
                   "5", "--head-seeds", "2", "--seed", "7", "--out", str(tmp_path / "gn")])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("verdict: embedding gradient norm = ") and "over 2 head seeds x 3 minibatches" in out[-1]
    with (tmp_path / "gn" / "grad_norms.csv").open() as f:
        rows = list(csv.DictReader(f))
    train = load_data("shift-lab").train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(7))[:15]
    batches = [(train.tensors[0][order[i:i + 5]], train.tensors[1][order[i:i + 5]]) for i in range(0, 15, 5)]
    expected = {}
    for seed in (7, 8):  # fused-ft finetune --seed 7 builds its model after torch.manual_seed(7)
        torch.manual_seed(seed)
        model = shift_lab.create_pretrained("shift-lab-vit", 4, progress=False)
        expected[seed] = _by_hand(model, batches, VIT_LAYERS)
    assert expected[7]["head"] != expected[8]["head"]  # two different heads were measured
    _check_rows_against_hand(rows, expected)


def test_grad_norms_on_an_imagefolder_read_the_training_images_without_augmentation(image_folder, tmp_path, capsys):
    from torchvision.datasets import ImageFolder

    from fused_ft.harness.data.transforms import paper_transforms
    from fused_ft.vision.models import create_model

    rc = cli.main(["grad-norms", "--model", "vit_tiny_patch16_224", "--image-size", "32", "--data",
                   f"imagefolder:{image_folder}", "--batches", "2", "--batch-size", "6", "--head-seeds", "1",
                   "--out", str(tmp_path)])
    assert rc == 0
    capsys.readouterr()
    with (tmp_path / "grad_norms.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["num_params"] == str(192 * 2 + 2)  # the data's two classes
    train = ImageFolder(str(image_folder / "train"), transform=paper_transforms("imagefolder", 32)[1])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:12].tolist()
    batches = [tuple(torch.stack([torch.as_tensor(train[i][k]) for i in order[j:j + 6]]) for k in (0, 1))
               for j in (0, 6)]
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 2, image_size=32)
    layers = {"embedding": ("patch_embed.",), "blocks.0": ("blocks.0.",), "blocks.11": ("blocks.11.",),
              "head": ("head.",)}
    _check_rows_against_hand(rows, {0: _by_hand(model, batches, layers)})


def _crossed_table(head_seeds, batches, rng, spread=0.5):
    """Runs whose embedding norm is 4 + a_s + c_b (a head-seed effect and a minibatch effect, each
    N(0, spread^2)) over one middle layer fixed at 1: the ratio is the cells' mean."""
    a, c = rng.normal(0, spread, head_seeds), rng.normal(0, spread, batches)
    cells = 4.0 + a[:, None] + c[None, :]
    return _runs(cells.tolist(), [[[1.0] * batches] * head_seeds])


@pytest.mark.parametrize("head_seeds, batches", [(3, 3), (3, 24), (24, 3), (24, 24)])
def test_the_interval_has_the_width_of_the_crossed_design_standard_error(head_seeds, batches):
    # the bootstrap's variance of a crossed mean is s_a^2 (S-1)/S^2 + s_c^2 (B-1)/B^2; a 95% interval is
    # about 2 x 1.96 of its root. Averaged over 30 tables, the width must match it within 15%.
    rng = np.random.default_rng(0)
    widths = [(lambda v: v.high - v.low)(verdict(_crossed_table(head_seeds, batches, rng), resamples=1000))
              for _ in range(30)]
    predicted = 2 * 1.96 * math.sqrt(0.25 * (head_seeds - 1) / head_seeds ** 2 + 0.25 * (batches - 1) / batches ** 2)
    assert np.mean(widths) == pytest.approx(predicted, rel=0.15)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def test_the_interval_narrows_as_batches_and_head_seeds_grow():
    from torch.utils.data import TensorDataset

    from fused_ft.harness.diagnostics import grad_norms_over_head_seeds

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(2048, 8, generator=g), torch.randint(0, 3, (2048,), generator=g))
    torch.manual_seed(1)
    pretrained = {k: v for k, v in TinyNet().state_dict().items() if not k.startswith("head.")}

    def build():  # the same "pretrained" body, a new head per seed
        model = TinyNet()
        model.load_state_dict(pretrained, strict=False)
        return model

    def mean_width(count):  # over 4 replicates: other minibatches, other heads
        widths = []
        for r in range(4):
            runs = grad_norms_over_head_seeds(build, data, range(100 * r, 100 * r + count), batches=count,
                                              batch_size=8, seed=r, names=["embed"])
            v = verdict(runs)
            widths.append(v.high - v.low)
        return np.mean(widths)

    few, many = mean_width(3), mean_width(16)
    # predicted by the crossed design's standard error: sqrt((16-1)/16^2 / ((3-1)/3^2)) = 0.51
    assert many < 0.7 * few


def test_pretrained_models_need_data_and_the_data_decides_the_classes(tmp_path):
    from fused_ft.harness.diagnostics import diagnose

    for args in (["--model", "vit_tiny_patch16_224", "--pretrained"], ["--model", "shift-lab-vit"]):
        proc = subprocess.run([sys.executable, "-m", "fused_ft.cli", "grad-norms", *args, "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Invalid --data: none given for the pretrained" in proc.stderr
        for choice in ("shift-lab", "imagefolder:DIR", "waterbirds:DIR", "domainnet:DIR", "--data noise"):
            assert choice in proc.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match=r"Invalid --num-classes: 5 \(the data shift-lab:style has 4 classes"):
        diagnose("vit_tiny_patch16_224", "shift-lab", image_size=32, num_classes=5)


@pytest.mark.parametrize("model", ["clip-vit-b16", "vit_tiny_patch16_224"])
def test_pretrained_offline_fails_in_one_line(model, tmp_path):
    # a machine without network, as it is (no HF_HUB_OFFLINE): the hub's host does not resolve
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["FUSED_FT_HUB_HOST"] = "hub.invalid"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fused_ft.cli", "grad-norms", "--model", model, "--pretrained",
                           "--data", "noise", "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "cannot be reached and they are not in the local cache" in lines[0] and "--checkpoint PATH" in lines[0]
    # huggingface_hub's retries took ~50 s here; a loose bound, so that a slow CI machine does not fail it
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, repo", [("convnext-b", "timm/convnext_base.fb_in22k"),
                                        ("openclip-vit-h14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")])
def test_offline_pretrained_fails_before_building_unless_the_weights_may_be_cached(name, repo, tmp_path,
                                                                                    monkeypatch):
    # building a ViT-H takes longer than the failure: offline with nothing cached, nothing is built; with
    # the hub's cache folder of the weights present, the library is asked to build (and to load them)
    import huggingface_hub.constants as hub
    import open_clip
    import timm

    from fused_ft.vision import models

    built = []

    def build(*args, **kwargs):
        built.append(args[0])
        raise OSError("offline")

    monkeypatch.setattr(models, "HUB_HOST", "hub.invalid")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    monkeypatch.setattr(timm, "create_model", build)
    monkeypatch.setattr(open_clip, "create_model", build)
    with pytest.raises(models.PretrainedWeightsError, match="cannot be reached and they are not in the local cache"):
        models.create_model(name, 10, pretrained=True)
    assert built == []
    (tmp_path / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots").mkdir(parents=True)
    with pytest.raises(models.PretrainedWeightsError, match="cannot be reached and they are not in the local cache"):
        models.create_model(name, 10, pretrained=True)
    assert len(built) == 1
