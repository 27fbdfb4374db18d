"""twotower: Nemotron-Labs-TwoTower, a block-wise autoregressive diffusion LM, in plain PyTorch.

The names below are imported on first use (`lazy_imports.py`): `twotower.TwoTowerForCausalLM` and
`from twotower import *` give what an eager import would, and `import twotower` alone loads no torch.
"""

from .lazy_imports import lazy_attributes

# public name -> the submodule that defines it
_SOURCES = {
    "HybridCache": "cache",
    "NemotronHConfig": "config",
    "nemotron_3_nano_30b_config": "config",
    "load_default": "default",
    "load_model": "default",
    "GenerateOutput": "generation",
    "GenerationStats": "generation",
    "generate_ar": "generation",
    "MODES": "modes",
    "SamplingParams": "params",
    "DiffusionParams": "params",
    "GenerateOptions": "params",
    "NemotronHForCausalLM": "modeling",
    "NemotronHModel": "modeling",
    "TwoTowerConfig": "two_tower",
    "TwoTowerForCausalLM": "two_tower",
}
__all__ = list(_SOURCES)
__getattr__, __dir__ = lazy_attributes(globals(), _SOURCES)
