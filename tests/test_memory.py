"""Memory profiler: closed-form bytes, agreement with the OS's count, the CLI, step in backward."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fused_ft import cli
from fused_ft.memory import profile_memory
from fused_ft.vision.methods import METHODS

# fp32 state tensors per trainable parameter, from each method's optimizer and options
STATE_KINDS = {"sgd": 1, "sgd-nomom": 0, "adamw": 2, "lars": 1, "lamb": 2}


def _state_kinds(method: str) -> int:
    m = METHODS[method]
    if m.optimizer in ("sgd", "lars"):
        return 1 if m.kwargs.get("momentum", 0) else 0
    return STATE_KINDS[m.optimizer]


@pytest.mark.parametrize("model", ["vit_tiny_patch16_224", "resnet10t"])
def test_simulated_bytes_are_the_closed_form_for_every_method(model):
    for method in METHODS:
        p = profile_memory(model, method, batch_size=2, image_size=64)
        assert p.mode == "simulated"
        assert p.parameters == 4 * p.num_params, method
        assert p.gradients == 4 * p.trainable_params, method
        assert p.optimizer_state == 4 * p.trainable_params * _state_kinds(method), method
        assert p.parameters + p.gradients_at_peak + p.optimizer_state + p.activations == p.peak
        if "freeze-embed" in method:
            assert p.trainable_params < p.num_params


def test_step_in_backward_keeps_few_gradients_alive(monkeypatch):
    from fused_ft.optim._base import FusedOptimizer

    normal = profile_memory("vit_tiny_patch16_224", "sgd-freeze-embed-nomom", image_size=64)
    largest = max(p.numel() for p in __import__("timm").create_model("vit_tiny_patch16_224").parameters()) * 4
    bucket = 2 * 2**20  # the 22 MB of vit_tiny's gradients would fit in one default (25 MB) bucket
    monkeypatch.setattr(FusedOptimizer, "BUCKET_BYTES", bucket)
    inside = profile_memory("vit_tiny_patch16_224", "sgd-freeze-embed-nomom", image_size=64, step_in_backward=True)
    assert inside.gradients <= bucket + 2 * largest < normal.gradients  # one bucket beyond what autograd holds
    assert inside.peak < normal.peak
    # a later profile of the same (cached) model is not disturbed by the earlier optimizer's hooks
    adamw = profile_memory("vit_tiny_patch16_224", "adamw", image_size=64, step_in_backward=True)
    assert adamw.optimizer_state == 8 * adamw.trainable_params


@pytest.mark.parametrize("method,in_backward", [("adamw", False), ("sgd-freeze-embed-nomom", True)])
def test_simulated_peak_matches_measured_rss_within_10_percent(method, in_backward):
    # the step's own memory (peak minus what was alive before it): simulated on meta tensors, measured
    # by the kernel (VmHWM) in a fresh process whose allocator returns freed tensors to the OS
    model, batch, size = "vit_small_patch16_224", 8, 160
    probe = Path(__file__).with_name("probes") / "rss_step.py"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(probe), model, method, str(batch), str(size), str(int(in_backward))],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    sim = profile_memory(model, method, batch_size=batch, image_size=size, step_in_backward=in_backward)
    simulated_delta = sim.peak - sim.extra["baseline"]
    measured_delta = measured["peak"] - measured["before"]
    assert measured_delta == pytest.approx(simulated_delta, rel=0.10), (measured_delta, simulated_delta)


def test_memory_cli_formats_and_plot(tmp_path, capsys):
    args = ["memory", "--models", "vit_tiny_patch16_224", "--methods", "sgd-freeze-embed-nomom,adamw"]
    assert cli.main(args + ["--format", "json", "--plot", str(tmp_path / "mem.png")]) == 0
    text = capsys.readouterr().out
    rows = json.loads(text[: text.rindex("]") + 1])
    assert [r["method"] for r in rows] == ["sgd-freeze-embed-nomom", "adamw"]
    assert rows[1]["ratio_to_adamw"] == 1.0 and rows[0]["ratio_to_adamw"] < 1.0
    assert rows[0]["adamw_peak"] == rows[1]["peak"]
    assert rows[0]["paper_adamw_overhead"] is None  # numbers or null in JSON, never a string
    from fused_ft.memory.report import PAPER_ADAMW_OVERHEAD, _paper_cell

    assert PAPER_ADAMW_OVERHEAD[("openclip-vit-h14", "sgd-freeze-embed-nomom")] == (0.60, True)
    assert _paper_cell({"paper_adamw_overhead": 0.6, "paper_adamw_overhead_is_lower_bound": True}) == ">= +60%"
    assert (tmp_path / "mem.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(args + ["--format", "md", "--step-in-backward"]) == 0
    md = capsys.readouterr().out
    assert "| vit_tiny_patch16_224 | sgd-freeze-embed-nomom (in-backward) |" in md
    assert cli.main(["memory", "--models", "vit_tiny_patch16_224", "--methods", "sgd,adam"]) == 2
    assert "Invalid method: 'adam'" in capsys.readouterr().err


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"Invalid batch_size: 0"):
        profile_memory("vit_tiny_patch16_224", "sgd", batch_size=0)
    with pytest.raises(ValueError, match=r"Invalid device: cpu for mode='simulated'"):
        profile_memory("vit_tiny_patch16_224", "sgd", device="cpu", mode="simulated")
    with pytest.raises(ValueError, match=r"Invalid device: cpu for mode='measured' \(needs CUDA"):
        profile_memory("vit_tiny_patch16_224", "sgd", device="cpu")


@pytest.mark.parametrize("update,state_bytes", [("nearest", 0), ("stochastic", 0), ("kahan", 2)])
def test_bf16_weights_halve_parameters_and_kahan_adds_two_bytes_of_state(update, state_bytes):
    fp32 = profile_memory("vit_tiny_patch16_224", "sgd-freeze-embed-nomom", image_size=64)
    bf16 = profile_memory("vit_tiny_patch16_224", "sgd-freeze-embed-nomom", image_size=64, param_dtype="bf16",
                          bf16_update=update)
    assert bf16.parameters * 2 == fp32.parameters
    assert bf16.gradients * 2 == fp32.gradients
    assert bf16.optimizer_state == state_bytes * bf16.trainable_params
    assert (bf16.param_dtype, bf16.bf16_update) == ("bfloat16", update)


def test_bad_param_dtype_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"Invalid param_dtype: 'fp16' \(choose from fp32, bf16\)"):
        profile_memory("vit_tiny_patch16_224", "sgd", param_dtype="fp16")


def test_memory_cli_gives_bf16_weights_a_row_per_update_mode(capsys):
    args = ["memory", "--models", "vit_tiny_patch16_224", "--methods", "sgd-freeze-embed-nomom", "--format", "json"]
    assert cli.main(args + ["--param-dtype", "bf16", "--bf16-update", "nearest,kahan"]) == 0
    text = capsys.readouterr().out
    rows = json.loads(text[: text.rindex("]") + 1])
    assert [(r["param_dtype"], r["bf16_update"]) for r in rows] == [("bfloat16", "nearest"), ("bfloat16", "kahan")]
    assert rows[1]["optimizer_state"] == 2 * rows[1]["trainable_params"]
    assert rows[0]["paper_adamw_overhead"] is None  # the paper trained fp32 weights
    with pytest.raises(SystemExit):  # argparse: one line naming the option, exit status 2
        cli.main(args + ["--param-dtype", "bf16", "--bf16-update", "round"])
    assert "--bf16-update: must be comma-separated values from nearest, stochastic, kahan" in capsys.readouterr().err


def test_memory_cli_in_backward_leaves_lamb_out_with_a_note(capsys):
    # LAMB's global clipping cannot step in backward: the table goes on without it, and says why
    args = ["memory", "--models", "vit_tiny_patch16_224", "--methods", "lamb,sgd", "--step-in-backward"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "sgd (in-backward)" in captured.out and "lamb" not in captured.out
    assert "note: lamb: not profiled: Invalid step_in_backward=True with max_grad_norm=1.0" in captured.err


def test_a_cuda_capability_adds_two_cublas_workspaces_to_activations_and_peak():
    """torch's defaults (CublasHandlePool.cpp): 32 MiB a workspace on sm_90, 8 MiB + 128 KiB elsewhere;
    two of them (the forward's thread and autograd's), as an H200 run allocated."""
    from fused_ft.memory import cuda_workspace_bytes

    plain = profile_memory("vit_tiny_patch16_224", "sgd-freeze-embed", image_size=64)
    elsewhere = 8 * 2**20 + 128 * 2**10
    cases = (((9, 0), 32 * 2**20), ((10, 0), 32 * 2**20), ((12, 0), 32 * 2**20), ((8, 0), elsewhere),
             ((8, 9), elsewhere))
    for capability, one in cases:
        gpu = profile_memory("vit_tiny_patch16_224", "sgd-freeze-embed", image_size=64, cuda_capability=capability)
        assert gpu.extra["workspaces"] == 2 * one == cuda_workspace_bytes(capability)
        assert gpu.peak - plain.peak == gpu.activations - plain.activations == 2 * one, capability
        assert gpu.parameters + gpu.gradients_at_peak + gpu.optimizer_state + gpu.activations == gpu.peak
    assert plain.extra["workspaces"] == 0
    config = {"CUBLAS_WORKSPACE_CONFIG": ":4096:2:16:8"}  # KiB x count, summed
    assert cuda_workspace_bytes((9, 0), config) == 2 * (4096 * 1024 * 2 + 16 * 1024 * 8)
    separate = {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0"}  # then each handle has a cuBLASLt workspace too
    assert cuda_workspace_bytes((9, 0), separate) == 2 * (32 * 2**20 + 2**20)
    assert cuda_workspace_bytes((9, 0), {**separate, "CUBLASLT_WORKSPACE_SIZE": "4096"}) == 2 * (32 * 2**20 + 4 * 2**20)
    with pytest.raises(ValueError, match=r"^Invalid cuda_capability: '9\.0' \(a \(major, minor\) pair"):
        profile_memory("vit_tiny_patch16_224", "adamw", image_size=64, cuda_capability="9.0")
