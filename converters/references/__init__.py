"""PyTorch reference runners, one module per method family; importing this package registers all
of them with `converters.crosscheck` (every submodule is imported, so adding a file is enough)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
