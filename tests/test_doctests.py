"""The numbers the docstrings state are checked: every doctest in the package runs here."""

import doctest
import importlib
import pkgutil

import pytest

import pronet_wsi

MODULES = sorted(m.name for m in pkgutil.walk_packages(pronet_wsi.__path__, "pronet_wsi.")
                 if m.name != "pronet_wsi.__main__")


def test_the_modules_with_checked_numbers_have_doctests():
    finder = doctest.DocTestFinder()
    with_examples = {name for name in MODULES if any(t.examples for t in finder.find(importlib.import_module(name)))}
    assert {"pronet_wsi.tiling", "pronet_wsi.wsi.plan", "pronet_wsi.slide"} <= with_examples


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctest examples failed"
