"""The two-tower model: a frozen causal context tower and a denoiser tower that fills one block
of `block_size` positions at a time by mask diffusion (Nemotron-Labs-TwoTower; block diffusion as in
Arriola et al. 2025, arXiv:2503.09573).

Parameter names and shapes are the release's (`context_tower.*`, `context_lm_head`,
`denoiser_tower.*`, `lm_head`, `t_embedder.mlp.{0,2}`, `t_block.1`, `scale_shift_tables.{i}`),
so its state dict loads as it is.

Denoiser layer i conditions on the context tower's layer i: attention attends, with no mask, to
[context K/V ; the block's own K/V]; Mamba starts from the context's conv and SSM state and scans
the block forward. Logit j predicts the token at block position j.
"""

from __future__ import annotations

import copy
import importlib
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin

from .cache import HybridCache
from .compiled import compiled_version, is_compiled, plain, plain_inputs
from .config import NemotronHConfig
from .generation import (GenerationStats, decode_ar, finish_generation, refuse_step_callback, start_run,
                         streamed_part, transformers_generate)
from .hub import to_dtype
from .linear import Linear
from .modeling import LMInputs, NemotronHForCausalLM, NemotronHModel, NemotronHPreTrainedModel, causal_lm_forward
from .modes import Mode, get_mode, register_mode, run_mode
from .objectives import DIFFUSION_LOSS_ARGUMENTS, mamba_by_blocks, masked_diffusion_output
from .choices import DIFFUSION_CONFIG_FIELDS
from .params import DiffusionParams, GenerateOptions, SamplingParams, split_settings
from .rows import GenerationRows
from .sampler import DenoiseStep, sample_block
from .speculative import generate_speculative
from .time_conditioning import TimestepEmbedder


class TwoTowerConfig(NemotronHConfig):
    """The backbone's fields plus the diffusion settings; missing ones take the release's values."""

    mask_token_id: int = 3
    block_size: int = 16
    steps_per_block: int = 16
    confidence_threshold: float = 0.8
    time_embedding_dim: int = 256

    def __post_init__(self, **kwargs):
        if not self.architectures:
            self.architectures = ["NemotronHTwoTowerForCausalLM"]
        super().__post_init__(**kwargs)


# the self-contained modules an exported or saved folder carries, and the config entries naming them
CONFIG_MODULE = "configuration_nemotron_twotower"
MODELING_MODULE = "modeling_nemotron_twotower"
ARCHITECTURE = "NemotronHTwoTowerForCausalLM"
AUTO_MAP = {
    "AutoConfig": f"{CONFIG_MODULE}.TwoTowerConfig",
    "AutoModelForCausalLM": f"{MODELING_MODULE}.TwoTowerForCausalLM",
}


class TwoTowerForCausalLM(NemotronHPreTrainedModel, GenerationMixin):
    config_class = TwoTowerConfig
    base_model_prefix = "context_tower"  # the embedding accessors give the context side, what forward reads
    lm_head_name = "context_lm_head"
    compiled_methods = ("denoise_hidden",)  # what `compiled.compile_for_decoding` compiles

    def __init__(self, config: TwoTowerConfig):
        super().__init__(config)
        h = config.hidden_size
        self.context_tower = NemotronHModel(config)
        self.context_lm_head = Linear(h, config.vocab_size, bias=False)
        self.denoiser_tower = NemotronHModel(config)
        self.lm_head = Linear(h, config.vocab_size, bias=False)
        self.t_embedder = TimestepEmbedder(h, config.time_embedding_dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(h, 3 * h))
        self.scale_shift_tables = nn.ParameterList(  # ~ N(0, 1) / sqrt(H), as the release initialises them
            nn.Parameter(torch.randn(3, h) / math.sqrt(h)) for _ in range(len(config.layer_kinds))
        )
        self.post_init()
        self.freeze_context()

    # ------------------------------------------------------------------ construction

    def freeze_context(self) -> None:
        """The context side (tower and its head) never trains."""
        self.context_tower.requires_grad_(False)
        self.context_lm_head.requires_grad_(False)

    @classmethod
    def from_single_tower(cls, backbone: NemotronHForCausalLM, **diffusion_settings) -> "TwoTowerForCausalLM":
        """Both towers from one AR model, as the release was initialised: its body goes to both
        towers and its head to both heads; the time conditioning starts fresh."""
        config = TwoTowerConfig(**{**backbone.config.to_dict(), **diffusion_settings})
        model = to_dtype(cls(config), backbone.lm_head.weight.dtype)
        model.context_tower.load_state_dict(backbone.backbone.state_dict())
        model.denoiser_tower.load_state_dict(backbone.backbone.state_dict())
        model.context_lm_head.load_state_dict(backbone.lm_head.state_dict())
        model.lm_head.load_state_dict(backbone.lm_head.state_dict())
        return model

    def context_model(self) -> NemotronHForCausalLM:
        """The context tower and its head as a single-tower AR model (shares the weights)."""
        # auto_map points at the two-tower modules of an exported folder
        two_tower_only = (*DIFFUSION_CONFIG_FIELDS, "time_embedding_dim", "architectures", "auto_map")
        config = NemotronHConfig(**{k: v for k, v in self.config.to_dict().items() if k not in two_tower_only})
        with torch.device("meta"):
            single = NemotronHForCausalLM(config)
        single.backbone = self.context_tower
        single.lm_head = self.context_lm_head
        return single

    def place_towers_on_devices(self, context_device="cuda:0", denoiser_device="cuda:1") -> "TwoTowerForCausalLM":
        """Context tower and its head on one device, the denoiser side on another; caches cross
        once per block."""
        self.context_tower.to(context_device)
        self.context_lm_head.to(context_device)
        for module in (self.denoiser_tower, self.lm_head, self.t_embedder, self.t_block, self.scale_shift_tables):
            module.to(denoiser_device)
        return self

    @property
    def context_device(self) -> torch.device:
        return self.context_lm_head.weight.device

    @property
    def denoiser_device(self) -> torch.device:
        return self.lm_head.weight.device

    # ------------------------------------------------------------------ the denoiser

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """adaLN-single: t [b] -> [b, 3, H], shared by all layers before each adds its own table."""
        return self.t_block(self.t_embedder(t)).unflatten(-1, (3, -1))

    def denoise(self, x: torch.Tensor, t: torch.Tensor | None, context_states: list, attention_mask,
                block_size: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser forward, for generation (one block) and for the training loss (every block
        of a sequence at once): `denoise_hidden` (compiled under `compiled.compile_for_decoding`
        when gradients are off), then the head.

        x [b, n]: blocks of `block_size` positions, mask tokens where unknown (a short last block
        is padded at its end inside, which causal Mamba and the masked attention cannot see).
        t [b]: diffusion time (None: no time conditioning, as mock-AR). context_states: per layer,
        the context tower's attention (K, V) [b, kv_heads, keys, d], and for Mamba the (conv, ssm)
        state entering each block [b, blocks, ...] (None: zeros); None for MoE and MLP layers.
        attention_mask: bool over keys [context ; x], broadcastable to [b, 1, n, keys], or None
        (every key). Returns float32 logits [b, n, vocab], or [count, vocab] at the True entries
        of `positions` [b, n] in row-major order (the sampler and the loss read masked positions
        only, so the head runs there alone)."""
        fast = compiled_version(self, "denoise_hidden")
        if fast is not None:
            context_states, attention_mask = plain_inputs(
                context_states, [layer.kind for layer in self.denoiser_tower.layers], attention_mask)
            h = fast(self, plain(x), plain(t), context_states, attention_mask, block_size)
        else:
            h = self.denoise_hidden(x, t, context_states, attention_mask, block_size)
        if positions is not None:
            h = h[positions]
        return self.lm_head(self.denoiser_tower.norm_f(h)).float()

    def denoise_hidden(self, x: torch.Tensor, t: torch.Tensor | None, context_states: list, attention_mask,
                       block_size: int) -> torch.Tensor:
        """The denoiser tower's blocks over x [b, n] (arguments as `denoise`) -> [b, n, H], before
        norm_f."""
        t_emb = None if t is None else self.time_embedding(t)
        h = self.denoiser_tower.embeddings(x)
        for i, layer in enumerate(self.denoiser_tower.layers):
            modulation = None if t_emb is None else (self.scale_shift_tables[i][None] + t_emb).unbind(1)
            if layer.kind == "mamba":
                h = mamba_by_blocks(layer, h, context_states[i], modulation, block_size)
            else:
                h, _ = layer(h, context_states[i], mask=attention_mask, modulation=modulation, keep_state=False)
        return h

    def denoise_block(self, x: torch.Tensor, t: torch.Tensor | None, context: HybridCache,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """`denoise` for one block x [b, L] after the prefix whose context tower cache is `context`
        (not modified; moved to the denoiser's device if needed), as generation runs it."""
        device = self.denoiser_device
        context = context.to(device)  # a no-op in generate, which moves it once per block
        x = x.to(device)
        b, l = x.shape
        mask = None
        if context.pad_mask is not None:  # hide the prompts' left padding
            mask = torch.cat([context.pad_mask.to(device), torch.ones(b, l, dtype=torch.bool, device=device)], 1)
            mask = mask[:, None, None, :]
        states = [tuple(s[:, None] for s in state) if layer.kind == "mamba" and state is not None else state
                  for layer, state in zip(self.denoiser_tower.layers, context.states)]
        return self.denoise(x, None if t is None else t.to(device), states, mask, l,
                            None if positions is None else positions.to(device))

    def config_to_save(self) -> TwoTowerConfig:
        """The config with `auto_map`, so that `AutoModelForCausalLM.from_pretrained(folder,
        trust_remote_code=True)` gives this model (the release's architecture name)."""
        config = copy.deepcopy(self.config)
        config.architectures = [ARCHITECTURE]
        config.auto_map = dict(AUTO_MAP)
        return config

    def remote_code_files(self) -> dict[str, str]:
        """The configuration and modeling modules `auto_map` names: generated from the package's
        sources (`twotower.export`), or, when this class runs from those modules (loaded with
        trust_remote_code), their own text, so a saved folder always loads again."""
        package, _, module = __name__.rpartition(".")
        if module == "two_tower":
            return importlib.import_module(f"{package}.export").remote_code()
        modules = (sys.modules[TwoTowerConfig.__module__], sys.modules[__name__])
        return {Path(m.__file__).name: Path(m.__file__).read_text() for m in modules}

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize both towers' embeddings and both heads (transformers resizes one pair)."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        size = embeddings.num_embeddings
        self.denoiser_tower.embeddings = self._get_resized_embeddings(
            self.denoiser_tower.embeddings, size, mean_resizing=mean_resizing)
        self.lm_head = self._get_resized_lm_head(self.lm_head, size, mean_resizing=mean_resizing)
        self.freeze_context()
        return embeddings

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: HybridCache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int = 0, diffusion_block_size: int | None = None, **kwargs):
        """transformers' causal-LM forward of the context tower and its head, exactly as
        `NemotronHForCausalLM.forward` (logits, loss from `labels`, cache, hidden states).

        With `diffusion_block_size` (0: the config's `block_size`): the masked-diffusion training
        loss of the clean `input_ids` [b, n] (see `twotower.objectives.diffusion_loss`, whose
        `noise`, `generator`, `loss_mask`, `certainty_weight`, `prefix_fraction` and `ar_kl_weight` it takes), as a
        `MaskedDiffusionOutput`. Going through forward lets DDP/FSDP wrappers see the training step."""
        if diffusion_block_size is not None:
            own = {k: kwargs.pop(k) for k in DIFFUSION_LOSS_ARGUMENTS if k in kwargs}
            given = dict(attention_mask=attention_mask, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         labels=labels, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         logits_to_keep=logits_to_keep or None, **kwargs)
            extra = sorted(k for k, v in given.items() if v is not None)
            if extra:
                raise TypeError(f"the diffusion loss takes no {extra}: only clean input_ids, "
                                + ", ".join(DIFFUSION_LOSS_ARGUMENTS))
            out = masked_diffusion_output(self, input_ids, diffusion_block_size, **own)
        else:
            out = causal_lm_forward(self.context_tower, self.context_lm_head, LMInputs(
                input_ids, attention_mask, past_key_values, inputs_embeds, labels, use_cache, output_hidden_states,
                logits_to_keep), **kwargs)
        return out if return_dict is not False else out.to_tuple()

    def encode_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       cache: HybridCache | None = None) -> HybridCache:
        """Run the context tower over `input_ids` (continuing `cache` if given); returns the cache."""
        cache = cache if cache is not None else self.context_tower.new_cache()
        ids = input_ids.to(self.context_device)
        self.context_tower(ids, cache, None if attention_mask is None else attention_mask.to(ids.device))
        return cache

    # ------------------------------------------------------------------ generation

    def _context_for(self, rows: "GenerationRows", upto: int, use_cache: bool, stats: GenerationStats):
        """The context tower's cache over rows.seq[:, :upto] and the hidden states of the positions it
        just added. Cached: only positions not yet in `rows.context` are run. Reference
        (use_cache=False): a fresh cache over the whole prefix, every time."""
        if not use_cache or rows.context is None:
            rows.context = self.context_tower.new_cache()
        start = rows.context.length
        if start >= upto:
            return rows.context, None
        ids = rows.seq[:, start:upto].to(self.context_device)
        mask = None if rows.mask is None else rows.mask[:, start:upto].to(ids.device)
        h = self.context_tower(ids, rows.context, mask)
        stats.context_forwards += 1
        return rows.context, h

    def _begin(self, input_ids, attention_mask, max_new_tokens, sampling, options, forbidden_id=None):
        run = start_run(self, input_ids, attention_mask, max_new_tokens, sampling, options, forbidden_id)
        return GenerationRows(input_ids.cpu(), None if attention_mask is None else attention_mask.cpu().bool()), run

    @torch.no_grad()
    def generate_mask_diffusion(self, input_ids: torch.Tensor, max_new_tokens: int = 128, *,
                                attention_mask: torch.Tensor | None = None, sampling: SamplingParams | None = None,
                                diffusion: DiffusionParams | None = None, options: GenerateOptions | None = None,
                                **kwargs):
        """Block-wise mask diffusion: each block starts all-mask and is denoised for up to
        `steps_per_block` steps by `sampler.sample_block`, whose unmasking rule commits positions;
        the committed block then advances the context tower.

        Settings: `SamplingParams`, `DiffusionParams` (None fields: the model config's) and
        `GenerateOptions`, or any of their fields by keyword (temperature=..., block_size=...,
        eos_token_id=...), which override the objects' fields.

        Prompts of different lengths are left-padded with `attention_mask`. A row stops after the
        block holding its EOS (later tokens become pad, never streamed) and leaves the batch.
        `use_cache=False` recomputes the context tower from scratch for every block: the slow exact
        reference. Returns [b, prompt + generated] or a `GenerateOutput` with statistics; a `stats`
        given is filled as they grow (all three modes), so a streamer may end the call early
        (`generation.RowStreamer`) and the counts so far remain.
        """
        sampling, diffusion, options = split_settings("generate_mask_diffusion", kwargs, sampling, diffusion, options)
        diffusion = diffusion.resolve(self.config)
        L, mask_id, rule = diffusion.block_size, diffusion.mask_token_id, diffusion.rule()
        rows, run = self._begin(input_ids, attention_mask, max_new_tokens, sampling, options, forbidden_id=mask_id)
        eos, stats = options.eos_token_id, run.stats
        num_blocks = -(-max_new_tokens // L)
        out = torch.full((input_ids.shape[0], num_blocks * L), run.pad_token_id, dtype=torch.long)
        fixed_batch = is_compiled(self)  # the compiled graphs keep one batch size
        for blk in range(num_blocks):
            context, _ = self._context_for(rows, rows.seq.shape[1], options.use_cache, stats)
            context = context.to(self.denoiser_device)  # the context crosses devices once per block
            of_rows = {}  # the context of the rows still denoising, per set of such rows

            def denoise(x, t):
                """Logits at the masked positions; eagerly, a row that committed its whole block sits
                out the step (it has no masked position to predict), so a batch's later steps cost
                what the rows still denoising cost."""
                stats.denoiser_forwards += 1
                masked = x == mask_id
                going = masked.any(-1)
                if fixed_batch or bool(going.all()):
                    return self.denoise_block(x, t, context, positions=masked)
                key = tuple(going.tolist())
                if key not in of_rows:
                    of_rows.clear()
                    of_rows[key] = context.select(going)
                return self.denoise_block(x[going], t[going], of_rows[key], positions=masked[going])

            def on_step(step, x, committed):
                if options.step_callback is not None:
                    options.step_callback(DenoiseStep(blk, step, x.cpu(), committed.cpu(), rows.index.clone()))

            x = torch.full((len(rows.index), L), mask_id, dtype=torch.long, device=self.denoiser_device)
            block = sample_block(denoise, rule, x, diffusion.steps_per_block, mask_id, run.sampling, on_step).cpu()
            out[rows.index, blk * L:(blk + 1) * L] = block
            if stats.first_block_latency is None:
                stats.first_block_latency = time.perf_counter() - run.start
            run.put(streamed_part(block[:, :max_new_tokens - blk * L], eos, run.pad_token_id))
            rows.append(block)
            if eos is not None:
                rows = rows.select(~(block == eos).any(-1))
            if len(rows.index) == 0 or run.out_of_time():
                out = out[:, :(blk + 1) * L]
                break
        return finish_generation(input_ids, out[:, :max_new_tokens], run)

    def generate_speculative(self, input_ids: torch.Tensor, max_new_tokens: int = 128, *,
                             attention_mask: torch.Tensor | None = None, sampling: SamplingParams | None = None,
                             diffusion: DiffusionParams | None = None, options: GenerateOptions | None = None,
                             **kwargs):
        """Lossless draft-and-verify decoding: each round the denoiser drafts a block of
        `block_size` in `draft_steps` steps and the context tower checks it in one forward; the
        agreeing prefix and one AR token are committed (see `twotower.speculative`). Greedy, the
        tokens are `generate_ar`'s; sampled, their distribution is. Settings as for
        `generate_mask_diffusion` (steps_per_block unused); the streamer gets the rows' tokens in
        lockstep, the step callback every draft step, and the statistics the drafted and
        accepted tokens of every row and round."""
        return generate_speculative(self, input_ids, max_new_tokens, attention_mask=attention_mask,
                                    sampling=sampling, diffusion=diffusion, options=options, **kwargs)

    @torch.no_grad()
    def generate_mock_ar(self, input_ids: torch.Tensor, max_new_tokens: int = 128, *,
                         attention_mask: torch.Tensor | None = None, sampling: SamplingParams | None = None,
                         options: GenerateOptions | None = None, **kwargs):
        """One token at a time through the denoiser, with no time conditioning: its input is the
        last committed token, its context the state just before that token, and its head's output
        there predicts the next token (so the context cache stays one token behind). Settings as
        for `generate_mask_diffusion`, less the diffusion ones."""
        sampling, _, options = split_settings("generate_mock_ar", kwargs, sampling, None, options,
                                              takes=("sampling", "options"))
        refuse_step_callback(options, "generate_mock_ar")
        rows, run = self._begin(input_ids, attention_mask, max_new_tokens, sampling, options)

        def next_logits(rows):
            context, _ = self._context_for(rows, rows.seq.shape[1] - 1, options.use_cache, run.stats)
            run.stats.denoiser_forwards += 1
            return self.denoise_block(rows.seq[:, -1:], None, context)[:, -1]

        return self._decode(input_ids, rows, next_logits, max_new_tokens, run)

    @torch.no_grad()
    def generate_ar(self, input_ids: torch.Tensor, max_new_tokens: int = 128, *,
                    attention_mask: torch.Tensor | None = None, sampling: SamplingParams | None = None,
                    options: GenerateOptions | None = None, **kwargs):
        """Plain AR decoding with the context tower and `context_lm_head` alone. Settings as for
        `generate_mask_diffusion`, less the diffusion ones."""
        sampling, _, options = split_settings("generate_ar", kwargs, sampling, None, options,
                                              takes=("sampling", "options"))
        refuse_step_callback(options, "generate_ar")
        rows, run = self._begin(input_ids, attention_mask, max_new_tokens, sampling, options)

        def next_logits(rows):
            _, h = self._context_for(rows, rows.seq.shape[1], options.use_cache, run.stats)
            return self.context_lm_head(h[:, -1]).float()

        return self._decode(input_ids, rows, next_logits, max_new_tokens, run)

    def generate(self, input_ids: torch.Tensor | None = None, generation_config=None, streamer=None,
                 mode: str | None = None, **kwargs):
        """The transformers entry point (`model.generate`, `pipeline("text-generation")`).

        `generation_config` (default: `self.generation_config`) updated by `kwargs` gives the
        settings (see `generation_settings`); `mode`, else `generation_config.mode`, else "ar",
        picks a mode of `MODES`. Other keyword arguments (attention_mask, generator, step_callback,
        any field of the settings objects) pass through. Settings this model cannot honour (beams,
        penalties, ...) are errors.
        """
        def run(config, ids, max_new_tokens, attention_mask, settings: dict):
            chosen = get_mode(mode or getattr(config, "mode", None) or "ar")
            sampling, diffusion, options = split_settings("generate", settings)
            return run_mode(self, chosen.name, ids, max_new_tokens, attention_mask=attention_mask,
                            sampling=sampling, diffusion=diffusion, options=options)

        return transformers_generate(self, input_ids, generation_config, streamer, kwargs, run)

    def _decode(self, input_ids, rows, next_logits, max_new_tokens, run):
        """The token-by-token modes: `next_logits(rows)` gives logits [b, v] for the rows' sequences."""

        def step(token, rows):
            rows.append(token.cpu())
            return next_logits(rows)

        return finish_generation(input_ids, decode_ar(step, rows, next_logits(rows), max_new_tokens, run), run)


# `AutoModelForCausalLM.from_config(TwoTowerConfig(...))` and `.from_pretrained(folder,
# config=TwoTowerConfig.from_pretrained(folder))` give this class. AutoConfig is left alone: it maps
# the checkpoints' model_type "nemotron_h" to transformers' own NemotronHConfig.
AutoModelForCausalLM.register(TwoTowerConfig, TwoTowerForCausalLM)


register_mode(Mode("ar", TwoTowerForCausalLM.generate_ar, False, "the context tower alone, a plain AR model"))
register_mode(Mode("mock-ar", TwoTowerForCausalLM.generate_mock_ar, False,
                   "the denoiser predicts one next token at a time"))
register_mode(Mode("diffusion", TwoTowerForCausalLM.generate_mask_diffusion, True,
                   "block-wise mask diffusion: the denoiser fills a block in a few steps"))
register_mode(Mode("speculative", TwoTowerForCausalLM.generate_speculative, True,
                   "the denoiser drafts a block, the context tower verifies it: exactly AR's output",
                   swept="draft_steps"))
