"""The docstring examples of the public modules run as written."""
import doctest
import importlib

import pytest

MODULES = ["fused_ft.embedding", "fused_ft.methods", "fused_ft.unfreeze", "fused_ft.models", "fused_ft.diagnostics",
           "fused_ft.optim.sgd", "fused_ft.optim.adamw", "fused_ft.optim.lars", "fused_ft.optim.lamb"]


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
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 6
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n".join(blocks))
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}  # block 3 sets it
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    expected = ["0 1", "LaunchConfig(block=1024, num_warps=4) {'adamw_kernel': 1}",
                "['patch_embed.proj.weight', 'patch_embed.proj.bias']"]
    for line in expected:
        assert line in readme and line in out, (line, out)
