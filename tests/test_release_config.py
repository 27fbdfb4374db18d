"""An exported config.json reads with a config class written as the release's remote code writes
it: `layers_block_type` derived, read-only, from `hybrid_override_pattern`, and every other key set
as an attribute. The file is strict JSON (no Infinity)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import randomize, tiny_config
from twotower import TwoTowerForCausalLM
from twotower.config import NemotronHConfig
from twotower.export import save_for_hub
from twotower.two_tower import TwoTowerConfig


class ReleaseLikeConfig:
    """The release's reading of config.json: the pattern and the layer count are fields, the block
    types a property derived from them with no setter; time_step_limit defaults to (0, inf)."""

    def __init__(self, hybrid_override_pattern="M" * 52, num_hidden_layers=52, time_step_limit=(0.0, float("inf")),
                 **kwargs):
        self.hybrid_override_pattern = hybrid_override_pattern
        self.num_hidden_layers = num_hidden_layers
        self.time_step_limit = tuple(time_step_limit)
        for key, value in kwargs.items():
            setattr(self, key, value)  # fails for a key that is a read-only property
        assert len(self.hybrid_override_pattern) == self.num_hidden_layers

    @property
    def layers_block_type(self):
        kinds = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
        return [kinds[c] for c in self.hybrid_override_pattern]


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path.name} is not valid JSON: {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("limit", [(0.0, float("inf")), (0.001, float("inf")), (0.001, 0.1)])
def test_exported_config_reads_with_the_release_config_class(tmp_path, limit):
    config = TwoTowerConfig(**tiny_config("M*EM-E*M", time_step_limit=limit).to_dict())
    model = randomize(TwoTowerForCausalLM(config).eval())
    save_for_hub(model, tmp_path / "export")
    raw = strict_json(tmp_path / "export" / "config.json")
    assert raw["hybrid_override_pattern"] == "M*EM-E*M" and raw["num_hidden_layers"] == 8
    assert "layers_block_type" not in raw
    release = ReleaseLikeConfig(**raw)
    assert release.layers_block_type == ["mamba", "attention", "moe", "mamba", "mlp", "moe", "attention", "mamba"]
    lo, hi = release.time_step_limit
    assert lo == limit[0] and (hi == limit[1] or (limit[1] == float("inf") and hi >= 1e308))
    # and it reads back as the same model
    again = TwoTowerForCausalLM.from_pretrained(tmp_path / "export")
    assert again.config.time_step_limit == limit and again.config.layer_kinds == "M*EM-E*M"
    ids = torch.tensor([[5, 9, 14, 33]])
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_the_pattern_is_written_even_at_the_default(tmp_path):
    config = NemotronHConfig()
    config.save_pretrained(tmp_path)
    raw = strict_json(tmp_path / "config.json")
    assert raw["hybrid_override_pattern"] == config.hybrid_override_pattern
    assert raw["num_hidden_layers"] == len(config.hybrid_override_pattern)
    assert ReleaseLikeConfig(**raw).layers_block_type
