"""The `twotower` command line. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

from .cpu_memory import keep_freed_memory

COMMANDS = {
    # name: (module, one-line help)
    "generate": ("twotower.generate_cli", "generate text in diffusion, mock-AR or AR mode"),
    "convert": ("twotower.convert", "convert between single-tower NemotronH and two-tower checkpoints"),
    "train": ("twotower.train_cli", "train a backbone (AR) or a two-tower model (masked diffusion)"),
    "recipe": ("twotower.recipe", "train a small TwoTower model end to end (resumable)"),
    "serve": ("twotower.serve", "an OpenAI-compatible HTTP server with streaming and request batching"),
    "bench": ("twotower.bench", "measure quality versus speed of AR, mock-AR and mask diffusion"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="twotower", description="Nemotron-Labs-TwoTower in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / the error for an unknown command
        return 2
    keep_freed_memory()  # this process is ours: spare its forwards the page faults (cpu_memory.py)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    command = argparse.ArgumentParser(prog=f"twotower {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(command)
    return module.run(command.parse_args(argv[1:])) or 0


if __name__ == "__main__":
    sys.exit(main())
