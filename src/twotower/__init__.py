"""twotower: Nemotron-Labs-TwoTower, a block-wise autoregressive diffusion LM, in plain PyTorch."""

from .cache import HybridCache
from .config import NemotronHConfig, nemotron_3_nano_30b_config
from .default import load_default, load_model
from .generation import GenerateOutput, GenerationStats, generate_ar
from .modeling import NemotronHForCausalLM, NemotronHModel
from .modes import MODES
from .params import DiffusionParams, GenerateOptions, SamplingParams
from .two_tower import TwoTowerConfig, TwoTowerForCausalLM

__all__ = [
    "HybridCache",
    "NemotronHConfig",
    "nemotron_3_nano_30b_config",
    "load_default",
    "load_model",
    "GenerateOutput",
    "GenerationStats",
    "generate_ar",
    "MODES",
    "SamplingParams",
    "DiffusionParams",
    "GenerateOptions",
    "NemotronHForCausalLM",
    "NemotronHModel",
    "TwoTowerConfig",
    "TwoTowerForCausalLM",
]
