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
    for section in ("parity", "speed", "memory"):
        assert f"### {section}" in text
        assert f"\n{section}: ERROR" not in text
    assert "parity: passed" in text and "memory: passed" in text
    assert text.count("| smoke | fp32 |") == sum(3 if u.optimizer in ("sgd", "adamw") else 2 for u in UPDATES.values())
    assert "sgd-freeze-embed-nomom | step_in_backward=True, param_dtype=bf16, bf16_update=stochastic" in text


def test_a_section_that_raises_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(env):
        raise RuntimeError("planted")

    monkeypatch.setitem(gpu_check.SECTIONS, "parity", broken)
    status, text = gpu_check.run(gpu_check.Env("cpu", "cpu", True, steps=2, rounds=1), ["parity", "memory"])
    assert status == 1
    assert "RuntimeError: planted" in text and "parity: ERROR" in text and "memory: passed" in text


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
    assert gpu_check.min_bytes("sgd", torch.bfloat16) == 2 + 4 + 8
    assert gpu_check.multi_step_bound(1e-6, 9.4e-7) == pytest.approx(1.88e-6)
    assert gpu_check.multi_step_bound(1e-6, 0.0) == 1e-6
    assert gpu_check.TARGET_FRACTION["lars"] == 20 / 28 and gpu_check.TARGET_FRACTION["lamb"] == 28 / 44
    assert gpu_check.speed_verdict("sgd", 0.93, 1.0, 1.2)[0]
    assert not gpu_check.speed_verdict("sgd", 0.93, 1.3, 1.2)[0]  # slower than torch fused
    assert not gpu_check.speed_verdict("adamw", 0.84, 1.0, 1.2)[0]
    assert gpu_check.speed_verdict("lamb", 0.64, 9.0, None)[0]
