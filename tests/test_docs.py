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
