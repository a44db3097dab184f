"""Layer-gradient diagnostics: Eq. 3.1 against a hand computation, the verdict, the CLI."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from fused_ft import cli
from fused_ft.diagnostics import LayerGradNorm, layer_grad_norms, verdict


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
    assert "not needed" in str(v) and "2.95x" in str(v)
    with pytest.raises(ValueError, match="Invalid rows"):
        verdict(middle)


def test_grad_norms_cli_writes_csv_png_and_verdict(tmp_path, capsys):
    rc = cli.main(["grad-norms", "--model", "vit_tiny_patch16_224", "--image-size", "32", "--num-classes", "5",
                   "--batches", "2", "--batch-size", "4", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "verdict: embedding gradient norm =" in out
    with (tmp_path / "grad_norms.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["role"] == "embedding" and rows[0]["layer"] == "embedding" and rows[-1]["role"] == "head"
    assert [r["layer"] for r in rows[1:-2]] == [f"blocks.{i}" for i in range(12)]
    # the same numbers as the Python API on the same seeded model and batches
    from fused_ft.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 5, image_size=32)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)) for _ in range(2)]
    api = layer_grad_norms(model, data)
    assert [float(r["grad_norm"]) for r in rows] == pytest.approx([r.grad_norm for r in api], rel=1e-6)
    png = (tmp_path / "grad_norms.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.parametrize("model", ["clip-vit-b16", "vit_tiny_patch16_224"])
def test_pretrained_offline_fails_in_one_line(model, tmp_path):
    # a machine without network, as it is (no HF_HUB_OFFLINE): the hub's host does not resolve
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["FUSED_FT_HUB_HOST"] = "hub.invalid"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fused_ft.cli", "grad-norms", "--model", model, "--pretrained",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
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

    from fused_ft import models

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
