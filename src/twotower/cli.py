"""The `twotower` command line. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when used. A command's
module imports torch (and the model code) only in `run`, so that `--help` and `--version` are
instant (tests/test_cli.py checks that neither loads torch)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .cpu_memory import keep_freed_memory

# optional dependencies a command needs: (modules, the extra that installs them)
NEEDS = {"serve": (("fastapi", "uvicorn"), "serve")}
INTERRUPTED = 130  # the shell's exit status for a process ended by Ctrl-C (128 + SIGINT)

COMMANDS = {
    # name: (module, one-line help)
    "generate": ("twotower.generate_cli", "generate text in diffusion, mock-AR or AR mode"),
    "convert": ("twotower.convert_cli", "convert between single-tower NemotronH and two-tower checkpoints"),
    "train": ("twotower.train_cli", "train a backbone (AR) or a two-tower model (masked diffusion)"),
    "recipe": ("twotower.recipes", "train a small TwoTower model end to end (resumable)"),
    "serve": ("twotower.serve", "an OpenAI-compatible HTTP server with streaming and request batching"),
    "bench": ("twotower.bench_cli", "measure quality versus speed of AR, mock-AR and mask diffusion"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version
    try:
        return installed_version("twotower")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def missing_dependencies(command: str) -> str | None:
    """A message naming the optional modules `command` needs that are not installed, if any."""
    import importlib.util
    modules, extra = NEEDS.get(command, ((), None))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"error: twotower {command} needs {', '.join(missing)}, which is not installed: "
            f"pip install 'twotower[{extra}]'")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="twotower", description="Nemotron-Labs-TwoTower in plain PyTorch")
    parser.add_argument("--version", action="version", version=f"twotower {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        try:
            parser.parse_args(argv)  # prints usage, the version, or the error for an unknown command
        except SystemExit as e:
            return int(e.code or 0)
        return 2
    message = missing_dependencies(argv[0])
    if message:
        print(message, file=sys.stderr)
        return 2
    try:
        keep_freed_memory()  # this process is ours: spare its forwards the page faults (cpu_memory.py)
        module = importlib.import_module(COMMANDS[argv[0]][0])
        command = argparse.ArgumentParser(prog=f"twotower {argv[0]}", description=COMMANDS[argv[0]][1])
        module.add_arguments(command)
        return module.run(command.parse_args(argv[1:])) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
