"""Names, fields and defaults the command line offers, importable without torch: `twotower --help`
and `twotower COMMAND --help` read them before any model code is loaded.

The mode and rule names are those of the registries that hold the code (`modes.MODES`, filled when
`two_tower.py` registers its modes, and `sampler.UNMASKING_RULES`), which import torch; tests check
that these names equal the registries' keys, in order.
"""

MODE_NAMES = ("ar", "mock-ar", "diffusion", "speculative")  # the modes two_tower.py registers
UNMASKING_RULE_NAMES = ("confidence", "fixed")  # the keys of sampler.UNMASKING_RULES
# the DiffusionParams fields a model's config holds (its defaults), with their types
DIFFUSION_CONFIG_FIELDS = {"block_size": int, "steps_per_block": int, "confidence_threshold": float,
                           "mask_token_id": int}
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # torch dtypes by name, for `twotower convert --dtype`
# the sweep of `twotower bench` (and of `bench.sweep`) and its new tokens per prompt
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
BLOCK_SIZES = (4, 8, 16, 32)
DRAFT_STEPS = (1, 2, 3)
MAX_NEW_TOKENS = 64
TASK_NEW_TOKENS = 16  # enough for every exact answer and its newline; tasks get at most this many
