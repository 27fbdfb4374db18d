"""Export a two-tower model as a Hugging Face Hub folder that loads where `twotower` is not installed.

`save_for_hub(model, folder)` writes the release's layout: config.json (model_type `nemotron_h`,
architectures ["NemotronHTwoTowerForCausalLM"]) with an `auto_map`, the weights as hub-layout
safetensors (sharded, with their index), generation_config.json, the tokenizer, and two modules,
so that

    transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

returns this package's `TwoTowerForCausalLM`, with its own loader and generate functions.

The modules are built at save time from the package's own sources, never kept as a copy:
`configuration_nemotron_twotower.py` is `config.py` plus the `TwoTowerConfig` class, and
`modeling_nemotron_twotower.py` is every module `two_tower.py` depends on, in dependency order,
then `two_tower.py` itself, with the package-relative imports removed (the names they bring are
defined earlier in the same file, or imported from the configuration module).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from pathlib import Path

import torch

from .hub import DEFAULT_SHARD_BYTES, INDEX_NAME, kept_dtype
from .two_tower import ARCHITECTURE, AUTO_MAP, CONFIG_MODULE, MODELING_MODULE, TwoTowerConfig

PACKAGE_DIR = Path(__file__).parent


class ExportError(RuntimeError):
    """The package's sources cannot be turned into self-contained modules (names the cause)."""


# ---------------------------------------------------------------------------- the generated modules

@functools.cache  # an export reads each module several times; the result is only read
def _parse(module: str) -> tuple[list[str], ast.Module]:
    source = (PACKAGE_DIR / f"{module}.py").read_text()
    return source.splitlines(), ast.parse(source)


def _package_imports(tree: ast.Module) -> dict[str, list[str]]:
    """`from .module import a, b` at the top of a module: {module: [a, b]}."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level != 1 or not node.module or any(a.asname for a in node.names):
                raise ExportError(f"cannot inline `{ast.unparse(node)}`: use `from .module import name`")
            found.setdefault(node.module, []).extend(a.name for a in node.names)
    return found


def _dependency_order(root: str) -> list[str]:
    """`root` and every package module it imports, each after the modules it imports."""
    order, seen = [], set()

    def visit(module):
        if module in seen:
            return
        seen.add(module)
        for dependency in _package_imports(_parse(module)[1]):
            visit(dependency)
        order.append(module)

    visit(root)
    return order


def _body(module: str, drop: tuple[str, ...] = ()) -> str:
    """A module's source without its docstring (kept as a comment), `from __future__` and
    package-relative imports, `__all__`, and the top-level definitions named in `drop`."""
    lines, tree = _parse(module)
    removed = set()
    for i, node in enumerate(tree.body):
        docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        package_import = isinstance(node, ast.ImportFrom) and (node.level or node.module == "__future__")
        exported = isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
        dropped = getattr(node, "name", None) in drop
        if docstring or package_import or exported or dropped:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            removed.update(range(start - 1, node.end_lineno))
    doc = ast.get_docstring(tree) or ""
    header = [f"# ---- twotower/{module}.py ----"] + [f"# {line}".rstrip() for line in doc.splitlines()]
    kept = "\n".join(line for i, line in enumerate(lines) if i not in removed).strip("\n")
    return "\n".join(header) + "\n\n" + kept + "\n"


def _top_level_names(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.extend(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _check(filename: str, source: str, allowed_import: str | None) -> None:
    """The generated module compiles, imports nothing from the package, and defines no name twice."""
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = ["twotower" if node.level and node.module != allowed_import else node.module or ""]
        else:
            continue
        if any(m.split(".")[0] == "twotower" for m in modules):
            raise ExportError(f"{filename}: line {node.lineno} imports from the package: {ast.unparse(node)}")
    names = _top_level_names(tree)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ExportError(f"{filename}: the inlined modules both define {twice}")
    compile(tree, filename, "exec")


def _module_header(what: str, sources: list[str]) -> str:
    listed = textwrap.fill(", ".join(sources), 100)
    return (f'"""{what}\n\nGenerated by `twotower.export`; change the twotower package, not this file. Its sources,\n'
            f'in dependency order, with the package-relative imports removed:\n{listed}\n"""\n\n'
            "from __future__ import annotations\n\n")


def remote_code() -> dict[str, str]:
    """{file name: source} of the two self-contained modules `save_for_hub` writes."""
    config_modules = _dependency_order("config")
    config_class = inspect.getsource(TwoTowerConfig)
    config_source = (_module_header("Configuration of the Nemotron-Labs-TwoTower model.",
                                    [f"{m}.py" for m in config_modules] + ["two_tower.py (TwoTowerConfig)"])
                     + "\n\n".join(_body(m) for m in config_modules)
                     + f"\n\n# ---- twotower/two_tower.py: TwoTowerConfig ----\n\n{config_class}")

    modeling_modules = [m for m in _dependency_order("two_tower") if m not in config_modules]
    from_config = {TwoTowerConfig.__name__}
    for module in modeling_modules:
        for dependency, names in _package_imports(_parse(module)[1]).items():
            if dependency in config_modules:
                from_config.update(names)
    modeling_source = (_module_header("Nemotron-Labs-TwoTower: context tower, denoiser tower, generation.",
                                      [f"{m}.py" for m in modeling_modules])
                       + f"from .{CONFIG_MODULE} import {', '.join(sorted(from_config))}\n\n\n"
                       + "\n\n".join(_body(m, drop=(TwoTowerConfig.__name__,)) for m in modeling_modules))

    files = {f"{CONFIG_MODULE}.py": config_source, f"{MODELING_MODULE}.py": modeling_source}
    _check(f"{CONFIG_MODULE}.py", config_source, None)
    _check(f"{MODELING_MODULE}.py", modeling_source, CONFIG_MODULE)
    return files


# ---------------------------------------------------------------------------- the folder

def export_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors `save_for_hub` writes, by checkpoint key: the model's state dict (its names are
    the release's), cast to `dtype` except the router and A_log, which stay float32. Works on a
    model built on `meta`, which gives the layout of a checkpoint without its weights."""
    return {k: t if dtype is None else t.to(kept_dtype(k, dtype)) for k, t in model.state_dict().items()}


def check_empty(folder: str | Path) -> None:
    """Refuse to write weights over a checkpoint: stale shards or index would mix with the new ones."""
    folder = Path(folder)
    old = sorted(p.name for p in folder.glob("*.safetensors")) + \
        ([INDEX_NAME] if (folder / INDEX_NAME).exists() else [])
    if old:
        raise FileExistsError(f"{folder} already holds a checkpoint ({', '.join(old[:3])}); choose an empty folder")


def save_for_hub(model, folder: str | Path, tokenizer=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 dtype: torch.dtype | None = None) -> Path:
    """Write `model` (a `TwoTowerForCausalLM`) as a Hub folder in the release's layout that loads
    with `trust_remote_code=True` without this package. Weights in `dtype` (default: as they are),
    in shards of at most `max_shard_bytes`; the tokenizer too if given. Returns the folder."""
    folder = Path(folder)
    check_empty(folder)  # save_pretrained makes the remote code before it writes anything: no half folder
    model.save_pretrained(folder, max_shard_bytes, state_dict=export_state_dict(model, dtype))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


__all__ = ["save_for_hub", "export_state_dict", "remote_code", "check_empty", "ExportError", "ARCHITECTURE",
           "AUTO_MAP"]
