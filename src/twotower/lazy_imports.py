"""Package attributes imported on first use (PEP 562), so that importing a package loads none of
its heavy submodules: `import twotower` and the command line's `--help` need neither torch nor
transformers, `twotower serve --help` neither fastapi."""

from __future__ import annotations

import importlib
import importlib.util


def lazy_attributes(package: dict, sources: dict[str, str]):
    """The module `__getattr__` and `__dir__` of the package whose globals are `package`: a name of
    `sources` comes from the submodule it maps to; any other public name that is a submodule
    (`twotower.sampler`) is that submodule. Each is imported at its first look-up and kept."""
    name_of_package = package["__name__"]

    def __getattr__(name: str):
        if name in sources:
            value = getattr(importlib.import_module(f"{name_of_package}.{sources[name]}"), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{name_of_package}.{name}") is not None:
            value = importlib.import_module(f"{name_of_package}.{name}")
        else:
            raise AttributeError(f"module {name_of_package!r} has no attribute {name!r}")
        package[name] = value  # later look-ups find it directly
        return value

    def __dir__() -> list[str]:
        return sorted(set(package) | set(sources))

    return __getattr__, __dir__
