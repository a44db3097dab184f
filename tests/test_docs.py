"""The docstring examples of the public modules run as written."""
import doctest
import importlib

import pytest

from fused_ft.harness import demo
from fused_ft.memory import report
from tests.helpers import README, readme_block


MODULES = ["fused_ft.vision.embedding", "fused_ft.vision.methods", "fused_ft.vision.unfreeze", "fused_ft.vision.models",
           "fused_ft.harness.diagnostics._measure", "fused_ft.harness.diagnostics._verdict", "fused_ft.optim.sgd",
           "fused_ft.optim.adamw", "fused_ft.optim.lars", "fused_ft.optim.lamb", "fused_ft.integrations.timm"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


def test_readme_python_snippets_run_and_print_what_the_readme_shows(tmp_path):
    """Every ```python block of the README, in order in one fresh process (later blocks use earlier
    names), and each printed line the README gives as a comment."""
    import re
    import subprocess
    import sys

    readme = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 6
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n".join(blocks))
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}  # block 3 sets it
    env.update(TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1")  # the trainer recipes write checkpoints to a temp folder
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    expected = ["fused_ft.optim.sgd True", "1.899999976158142", "0 1",
                "LaunchConfig(block=1024, num_warps=4) {'adamw_kernel': 1}",
                "['patch_embed.proj.weight', 'patch_embed.proj.bias']", "3 4 True", "graph breaks: 0"]
    for line in expected:
        assert line in readme and line in out, (line, out)


@pytest.mark.parametrize("model", report.DEFAULT_MODELS)  # one model a test: they share the workers
def test_readme_demo_part_1_rows_are_what_make_demo_prints(model):
    block = readme_block("make demo part 1")
    assert {line.split()[0] for line in block[2:]} == set(report.DEFAULT_MODELS)
    printed = demo.memory_table([model], progress=False).splitlines()
    assert printed[0].split() == block[0].split()
    # compared cell by cell: the column widths of one model's table differ from the three models'
    assert [line.split() for line in printed[2:]] == [line.split() for line in block[2:] if line.startswith(model)]


def test_readme_demo_part_2_is_what_make_demo_prints_and_meets_the_memory_bars():
    runs = report.beyond_the_paper()
    assert demo.beyond_the_paper_lines(runs) == readme_block("make demo part 2")
    peak = {label: p for label, p in runs}
    adamw = peak["adamw"]
    # the step-in-backward bar: >= 3x, checkpointing on both sides (the paper's Sec. 5 trick)
    in_backward = peak["sgd-freeze-embed-nomom, step in backward + checkpointing"]
    assert peak["adamw + checkpointing"].peak / in_backward.peak >= 3.0
    # the bf16 bar: >= 5x without checkpointing on either side; bf16 halves the weights and adds no state
    bf16 = peak["sgd-freeze-embed-nomom, step in backward, bf16 weights + stochastic rounding"]
    assert bf16.parameters * 2 == adamw.parameters and bf16.optimizer_state == 0
    assert adamw.peak / bf16.peak >= 5.0
