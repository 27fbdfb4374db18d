"""`twotower generate PROMPT`: text from the embedded model (or --model) in any mode of `MODES`.

Diffusion output streams block by block; `--show-steps` redraws the block being denoised after
every step, masked positions as `_`, so the order in which tokens are committed can be watched.
"""

from __future__ import annotations

import sys

from .choices import MODE_NAMES, UNMASKING_RULE_NAMES

# torch, transformers and the model code are imported when a command runs, not for its --help


def add_arguments(p) -> None:
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--mode", choices=MODE_NAMES, default="diffusion")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=None, help="default: the model's (16)")
    p.add_argument("--steps-per-block", type=int, default=None, help="default: the model's (16)")
    p.add_argument("--threshold", type=float, default=None, help="confidence threshold (default: the model's, 0.8)")
    p.add_argument("--draft-steps", type=int, default=1, help="denoising steps of a speculative draft (default: 1)")
    p.add_argument("--unmasking", choices=UNMASKING_RULE_NAMES, default="confidence",
                   help="which predictions a denoising step commits: confidence (above --threshold) or fixed "
                        "(block size / steps per block each step, the most confident first)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-steps", action="store_true", help="draw every denoising step (diffusion)")
    p.add_argument("--stats", action="store_true", help="print forwards, tokens per forward and tokens/s")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding hot path with torch.compile (pays a compile time first: see --stats)")


class TextStream:
    """A transformers-style streamer that prints each committed piece as soon as it exists (a
    character whose bytes are split across tokens waits for its last token)."""

    def __init__(self, tokenizer, out=sys.stdout):
        from .tokenizer import IncrementalText

        self.text = IncrementalText(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), ())
        self.out = out
        self.prompt_seen = False

    def put(self, value) -> None:  # a tensor of token ids
        if not self.prompt_seen:  # the first put is the prompt
            self.prompt_seen = True
            return
        self._write(self.text.feed(value.reshape(-1).tolist(), final=False)[0])

    def end(self) -> None:
        self._write(self.text.feed([], final=True)[0] + "\n")

    def _write(self, piece: str) -> None:
        self.out.write(piece)
        self.out.flush()


def render_step(tokenizer, step, mask_token_id: int, bold: bool = True) -> str:
    """One line per denoising step: committed tokens as text, masked positions as `_`; with
    `bold` (a terminal), the tokens committed at this step in bold."""
    pieces = ["_" if t == mask_token_id else tokenizer.decode([t]) for t in step.tokens[0].tolist()]
    new = step.committed[0].tolist()
    shown = "".join(f"\033[1m{p}\033[0m" if fresh and bold else p for p, fresh in zip(pieces, new))
    return f"block {step.block} step {step.step:2d} |{shown}|"


def run(args) -> int:
    from .default import load_model
    from .modes import MODES, run_mode

    try:
        model, tokenizer = load_model(args.model)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    longest = model.config.max_position_embeddings
    if ids.shape[1] + args.max_new_tokens > longest:
        print(f"warning: the prompt ({ids.shape[1]} tokens) and --max-new-tokens ({args.max_new_tokens}) exceed "
              f"the model's max_position_embeddings ({longest}): it was not trained on sequences this long",
              file=sys.stderr)
    common = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  eos_token_id=tokenizer.eos_token_id, return_dict_in_generate=True, compile=args.compile)
    sys.stdout.write(args.prompt)
    draws_steps = args.show_steps and MODES[args.mode].uses_diffusion  # other modes have no steps: they stream
    stream = None if draws_steps else TextStream(tokenizer)
    callback = None
    if draws_steps:
        sys.stdout.write("\n")
        mask_id, bold = model.config.mask_token_id, sys.stdout.isatty()  # no escape codes into pipes and files

        def callback(step):
            print(render_step(tokenizer, step, mask_id, bold), flush=True)
    try:
        out = run_mode(model, args.mode, ids, args.max_new_tokens, block_size=args.block_size,
                       steps_per_block=args.steps_per_block, confidence_threshold=args.threshold,
                       unmasking=args.unmasking, draft_steps=args.draft_steps, streamer=stream,
                       step_callback=callback, **common)
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    if draws_steps:
        print(args.prompt + tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
    if args.stats:
        s = out.stats
        print(f"[{args.mode}] {s.generated_tokens} tokens in {s.wall_time:.2f}s ({s.tokens_per_second:.1f} tok/s); "
              f"denoiser forwards {s.denoiser_forwards}, context forwards {s.context_forwards}, "
              f"tokens per denoiser forward {s.tokens_per_denoiser_forward:.2f}"
              + (f"; {s.compile_seconds:.1f}s of it compiling" if s.compile_seconds else ""), file=sys.stderr)
        if s.rounds:
            print(f"[{args.mode}] drafted {s.drafted_tokens}, accepted {s.accepted_tokens} "
                  f"({s.acceptance_rate:.0%}), tokens per round {s.tokens_per_round:.2f}", file=sys.stderr)
    return 0
