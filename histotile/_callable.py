"""``histotile.tile(...)``, ``histotile.predict(...)`` and ``histotile.train(...)`` as plain calls.

Each entry point lives in a submodule of the same name. Once that submodule is imported (the CLI
imports it), Python sets the package attribute to the *module*, which would shadow the lazily
exported function. Making those modules callable keeps both spellings working.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def make_module_callable(module_name: str, function_name: str) -> None:
    """Calling module ``module_name`` calls its function ``function_name``."""

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, function_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
