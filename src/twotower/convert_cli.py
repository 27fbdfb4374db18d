"""`twotower convert SOURCE TARGET --to two-tower|single-tower`: the command line of `convert.py`,
which it imports (and with it torch) only when it runs."""

from __future__ import annotations

import sys

from .choices import DIFFUSION_CONFIG_FIELDS, WEIGHT_DTYPES


def add_arguments(p) -> None:
    p.add_argument("source", help="checkpoint folder to read")
    p.add_argument("target", help="folder to write (must not hold a checkpoint yet)")
    p.add_argument("--to", required=True, choices=("two-tower", "single-tower"),
                   help="two-tower: from a NemotronH AR checkpoint; single-tower: the context tower of a two-tower one")
    p.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES), default=None, help="weight dtype (default: the source's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    for name, kind in DIFFUSION_CONFIG_FIELDS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help="two-tower only (default: the release's)")


def run(args) -> int:
    from .convert import DTYPES, check_source, parse_size, to_single_tower, to_two_tower

    settings = {k: getattr(args, k) for k in DIFFUSION_CONFIG_FIELDS if getattr(args, k) is not None}
    try:
        if settings and args.to == "single-tower":
            raise ValueError(f"{sorted(settings)} only apply with --to two-tower")
        check_source(args.source, args.to)
        dtype = DTYPES[args.dtype] if args.dtype else None
        shard = parse_size(args.max_shard_size)
        if args.to == "two-tower":
            to_two_tower(args.source, args.target, dtype, shard, **settings)
        else:
            to_single_tower(args.source, args.target, dtype, shard)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.target}")
    return 0
