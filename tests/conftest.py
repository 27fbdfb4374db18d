"""Shared helpers: small random NemotronH configurations, deterministic random weights, text the
repository ships, and a guard that fails any test reading files outside the repository."""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

# Libraries' caches (Hugging Face, matplotlib) start empty in the temp dir, as in a fresh machine
# and before those libraries are imported: nothing a test uses may come from this machine's caches.
_CACHES = Path(tempfile.mkdtemp(prefix="twotower-test-caches-"))
for _name in ("HF_HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
    os.environ[_name] = str(_CACHES / _name.lower())

import pytest  # noqa: E402
import torch  # noqa: E402

from twotower.config import NemotronHConfig  # noqa: E402


def tiny_config(pattern: str = "M*EM-E*M", **overrides) -> NemotronHConfig:
    """A configuration small enough for CPU tests that keeps every structural feature:
    GQA (4 query heads on 2 kv heads), several Mamba groups, top-k routing with a shared expert."""
    values = dict(
        vocab_size=97, hidden_size=32, hybrid_override_pattern=pattern,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=8,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24, intermediate_size=20, routed_scaling_factor=2.5,
        eos_token_id=2, pad_token_id=0, bos_token_id=1,
        # transformers' torch prefill clamps dt at time_step_min while its decode step and the CUDA
        # kernels of the checkpoints (time_step_limit (0, inf)) do not; a tiny floor keeps the parity
        # tests about the shared math. test_dt_limit_is_the_configs covers the clamp itself.
        time_step_min=1e-6,
    )
    values.update(overrides)
    return NemotronHConfig(**values)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, head_std: float = 1.0) -> torch.nn.Module:
    """Give every parameter and buffer a random value (norm weights near 1, A_log and dt_bias in
    their trained ranges), so no part of the computation is a silent identity. `head_std` widens
    the output heads so greedy decisions are not near-ties."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        r = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name.endswith("A_log"):  # A in [-4.5, -1], as log(1..heads) gives in real models
            value = torch.rand(t.shape, generator=g) * 1.5
        elif name.endswith("dt_bias"):  # softplus(dt_bias) in about [0.007, 0.2], the trained range
            value = torch.rand(t.shape, generator=g) * 3.5 - 5.0
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            value = 1.0 + 0.1 * r
        elif name.endswith("e_score_correction_bias"):
            value = 0.05 * r
        elif "lm_head" in name:
            value = r * head_std / t.shape[-1] ** 0.5
        elif name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight")):
            value = 0.3 * r / t.shape[-1] ** 0.5  # residual branches scaled down, as in a trained model
        elif t.dim() >= 2:
            value = r / t.shape[-1] ** 0.5
        else:
            value = 0.1 * r
        t.copy_(value.to(t.dtype))
    return model


REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "tests" / "data" / "stories.txt"
HELDOUT = REPO / "src" / "twotower" / "default_model" / "heldout"


def story_text(chars: int | None = None) -> str:
    """Text the repository ships: the short stories of tests/data/stories.txt and the embedded
    model's held-out story prompts, repeated up to `chars` characters (all of it once if None)."""
    prompts = [json.loads(line)["prompt"] for line in (HELDOUT / "stories.jsonl").read_text().splitlines()]
    text = STORIES.read_text(encoding="utf-8") + "\n" + "\n\n".join(prompts) + "\n"
    if chars is None:
        return text
    return (text + "\n") * (chars // (len(text) + 1)) + text[: chars % (len(text) + 1)]


# ---------------------------------------------------------------- no reads outside the repository

def _allowed_roots() -> tuple[str, ...]:
    """Where tests may open files: the repository, the temp dir, the Python installation (imports,
    package data) and the kernel's pseudo-files and devices. Everything else (a sibling data folder,
    another machine's absolute paths, a user's caches) would not exist in a user's fresh clone."""
    roots = {REPO, Path(tempfile.gettempdir()), Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)}
    roots |= {Path(p) for p in sysconfig.get_paths().values()}
    roots |= {Path(p) for p in sys.path if p and Path(p).is_dir() and not Path(REPO).is_relative_to(p)}
    roots |= {Path("/dev"), Path("/proc"), Path("/sys"), Path("/etc"), Path("/usr")}
    roots |= {Path.home() / ".fonts", Path.home() / ".local" / "share" / "fonts"}  # matplotlib's font search
    return tuple(sorted({str(r.resolve()) for r in roots} | {str(r) for r in roots}))


_ALLOWED = _allowed_roots()
_outside: list[str] = []  # paths opened outside the allowed roots during the current test


def outside_the_allowed_roots(path) -> bool:
    if isinstance(path, int):  # a file descriptor: already open
        return False
    path = os.path.abspath(os.fsdecode(path))
    return not any(path == root or path.startswith(root.rstrip("/") + "/") for root in _ALLOWED)


def _audit(event: str, args: tuple) -> None:
    if event in ("open", "os.listdir", "os.scandir") and args and args[0] is not None:
        try:
            if outside_the_allowed_roots(args[0]):
                _outside.append(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            pass


sys.addaudithook(_audit)  # an audit hook stays for the whole process


@pytest.fixture(autouse=True)
def only_files_the_repository_has():
    """Fail a test that opened (or listed) a path outside the repository and the temp dir."""
    _outside.clear()
    yield
    found = sorted(set(_outside))
    _outside.clear()
    assert not found, f"the test read outside the repository and the temp dir: {found[:5]}"


def make_tiny_model_dir(folder, vocab_size: int = 384, seed: int = 0, pattern: str = "M*EM"):
    """A complete model folder (random TwoTower weights + a byte-level BPE tokenizer trained on a
    slice of the corpus), the same layout as the embedded model. Returns the folder."""
    from pathlib import Path

    from twotower import TwoTowerForCausalLM
    from twotower.tokenizer import train_tokenizer
    from twotower.two_tower import TwoTowerConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sample = folder / "sample.txt"
    sample.write_text(story_text(60_000))
    tokenizer = train_tokenizer([sample], folder, vocab_size=vocab_size)
    sample.unlink()
    torch.manual_seed(seed)
    config = TwoTowerConfig(**tiny_config(pattern, vocab_size=len(tokenizer)).to_dict())
    model = randomize(TwoTowerForCausalLM(config).eval(), seed=seed, head_std=4.0)
    model.save_pretrained(folder)
    return folder


def requested_device() -> torch.device:
    """Where the exactness tests that take the `device` fixture run: $TWOTOWER_TEST_DEVICE (cpu,
    cuda, cuda:1, ...), cpu when unset. benchmarks/gpu_check.py runs them on a GPU this way."""
    device = torch.device(os.environ.get("TWOTOWER_TEST_DEVICE") or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"TWOTOWER_TEST_DEVICE={device} but torch sees no CUDA device")
    return device


@pytest.fixture(scope="session")
def device() -> torch.device:
    return requested_device()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two shared cores: one intra-op thread for a module's servers, so spinning threads do not fight."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def embedded():
    """(model, tokenizer) of the model that ships inside the package."""
    from twotower.default import load_model

    return load_model(None)
