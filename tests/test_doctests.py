"""Run the doctest examples in every volseg module (they document the pure functions' contracts)."""

import doctest
import importlib
import pkgutil

import pytest

import volseg

MODULES = sorted(m.name for m in pkgutil.iter_modules(volseg.__path__, "volseg.") if m.name != "volseg.__main__")


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
