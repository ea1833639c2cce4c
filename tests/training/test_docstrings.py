"""The examples in the docstrings of fxprune.training run."""
import doctest
import importlib

import pytest

MODULES = ["sites", "decorrelation", "dynamic", "c2s2", "slimming", "distributed", "ddp_demo"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"fxprune.training.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
