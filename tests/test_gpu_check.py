"""benchmarks/gpu_check.py works before a GPU ever runs it: GPU time is scarce (15 minutes a task, when a
task gets one at all), and a script that dies on a typo in its third section wastes it.

``--smoke`` runs every section's code on the CPU on tiny inputs (the ``cpu`` backend in place of the
Triton kernels, memory simulated only); the rules the GPU verdicts rest on are checked against their
closed forms. Catches: a section that raises, a section whose failure hides the others, a wrong byte
count for bf16, a parity bound tighter than torch's own drift, a target other than the issue's.
"""
import pytest
import torch

from benchmarks import gpu_check
from fused_ft.testing.specs import UPDATES


def test_every_section_runs_and_reports_on_its_own(tmp_path):
    out = tmp_path / "gpu_check.md"
    assert gpu_check.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Command: `python -m benchmarks.gpu_check --smoke`" in text
    for section in ("parity", "speed", "memory", "loop", "replay", "scaler"):
        assert f"### {section}" in text
        assert f"\n{section}: ran (smoke run: no verdict)" in text  # a smoke run claims nothing
    rows = sum(3 if u.optimizer in ("sgd", "adamw") else 2 for u in UPDATES.values())
    assert text.count("| test ViT | fp32 |") == text.count("| test ViT | bf16 |") == rows  # the list branch ran
    assert "sgd-freeze-embed-nomom | step_in_backward=True, param_dtype=bf16, bf16_update=stochastic" in text
    # the simulated memory with sm_90's cuBLAS workspaces is 64 MiB above the tensors-only one, in every row
    memory = text.split("### memory")[1].split("### loop")[0]
    pairs = [line.split(" | ")[3:5] for line in memory.splitlines() if line.startswith("| test_vit")]
    assert len(pairs) == len(gpu_check.MEMORY_ROWS)
    assert all(abs(float(b) - float(a) - 64 / 1024) < 1.5e-3 for a, b in pairs), pairs
    loop = text.split("### loop")[1].split("### replay")[0]  # every case ran, step_in_backward ones with a verdict
    assert [line.split(" | ")[2] for line in loop.splitlines() if line.startswith("| test_vit")] == list(
        gpu_check.LOOP_CASES)
    replay = text.split("### replay")[1].split("### scaler")[0]  # every case and dtype, and the whole iteration
    assert replay.count(" | ok |") == 2 * len(gpu_check.REPLAY_CASES) + 1
    scaler = text.split("### scaler")[1]
    assert all(f"| {case} | n/a | yes | ok |" in scaler for case in gpu_check.SCALER_CASES)


def test_the_replay_bar_fails_a_replay_that_is_not_the_eager_step(monkeypatch):
    """A replay that repeats the captured values (here: a step run twice per replay) is reported FAILED."""
    def twice(step, env):
        return lambda: (step(), step())

    monkeypatch.setattr(gpu_check, "_captured", twice)
    ok, text = gpu_check.replay(gpu_check.Env("cpu", "cpu", True, steps=2, rounds=1))
    assert not ok and text.count("FAILED") == 2 * len(gpu_check.REPLAY_CASES) + 1


def test_a_subset_of_sections_is_run_and_named_in_the_command(tmp_path):
    out = tmp_path / "part.md"
    assert gpu_check.main(["--smoke", "--sections", "memory", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Command: `python -m benchmarks.gpu_check --smoke --sections memory`" in text
    assert "### memory" in text and "### parity" not in text and "### speed" not in text
    with pytest.raises(SystemExit):
        gpu_check.main(["--smoke", "--sections"])  # naming none is refused, not a run of nothing


def test_a_section_that_raises_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(env):
        raise RuntimeError("planted")

    monkeypatch.setitem(gpu_check.SECTIONS, "parity", broken)
    status, text = gpu_check.run(gpu_check.Env("cpu", "cpu", True, steps=2, rounds=1), ["parity", "memory"])
    assert status == 1
    assert "RuntimeError: planted" in text and "parity: ERROR" in text and "memory: ran" in text


def test_without_cuda_it_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main([]) == 2
    assert "gpu_check needs a CUDA device" in capsys.readouterr().err


def test_the_rules_behind_the_verdicts():
    for name, u in UPDATES.items():
        assert gpu_check.min_bytes(name, torch.float32) == u.min_bytes_per_param
        # bf16 gradient read and parameter read + write: 2 B each instead of 4; fp32 state unchanged
        assert gpu_check.min_bytes(name, torch.bfloat16) == u.min_bytes_per_param - 6
        # torch and timm keep bf16 state for bf16 parameters: everything halves
        assert gpu_check.min_bytes(name, torch.bfloat16, torch.bfloat16) * 2 == u.min_bytes_per_param
    assert gpu_check.min_bytes("sgd", torch.bfloat16) == 2 + 4 + 8
    assert gpu_check.min_bytes("adamw", torch.bfloat16, torch.bfloat16) == 2 + 4 + 8
    assert gpu_check.multi_step_bound(1e-6, 9.4e-7) == pytest.approx(1.88e-6)
    assert gpu_check.multi_step_bound(1e-6, 0.0) == 1e-6
    assert gpu_check.TARGET_FRACTION["lars"] == 20 / 28 and gpu_check.TARGET_FRACTION["lamb"] == 28 / 44
    assert gpu_check.speed_verdict("sgd", 0.93, 1.0, 1.2)[0]
    assert not gpu_check.speed_verdict("sgd", 0.93, 1.3, 1.2)[0]  # slower than torch fused
    assert not gpu_check.speed_verdict("adamw", 0.84, 1.0, 1.2)[0]
    assert gpu_check.speed_verdict("lamb", 0.64, 9.0, None)[0]
    assert gpu_check.speed_verdict("adamw", 0.90, 2.0, None)[0]  # bf16: torch's speed is not a target
