"""The command line's edges: --version, Ctrl-C, no escape codes in pipes, the prompt once with
--show-steps in a token-by-token mode, missing optional dependencies said up front, a long prompt
warned about, convert's errors, the file modes of written weights, the license."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, make_tiny_model_dir
from twotower.cli import INTERRUPTED, main

PROMPT = "Once upon a time"


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "twotower.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("twotower ")
    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2


def _sigint_as_in_a_terminal() -> None:
    """A suite started in the background of a non-interactive shell (`pytest &`) ignores SIGINT, and a
    Python started with SIGINT ignored never turns it into KeyboardInterrupt: the child gets the
    default disposition, as a command typed in a terminal has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_ends_without_a_traceback():
    process = subprocess.Popen([sys.executable, "-m", "twotower.cli", "generate", PROMPT, "--mode", "ar",
                                "--max-new-tokens", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                               preexec_fn=_sigint_as_in_a_terminal)
    try:
        assert process.stdout.read(len(PROMPT)) == PROMPT  # generating now
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == INTERRUPTED, err
    assert "Traceback" not in err and "interrupted" in err


def test_show_steps_writes_no_escape_codes_into_a_pipe_and_the_prompt_once():
    steps = cli("generate", PROMPT, "--max-new-tokens", "8", "--show-steps")
    assert steps.returncode == 0, steps.stderr
    assert "block 0 step" in steps.stdout and "\033[" not in steps.stdout
    ar = cli("generate", PROMPT, "--max-new-tokens", "8", "--show-steps", "--mode", "ar")
    assert ar.returncode == 0, ar.stderr
    assert ar.stdout.count(PROMPT) == 1 and len(ar.stdout.strip()) > len(PROMPT)


def test_bold_only_for_a_terminal():
    from types import SimpleNamespace

    from twotower.default import load_default
    from twotower.generate_cli import render_step
    tokenizer = load_default()[1]
    step = SimpleNamespace(block=0, step=0, tokens=torch.tensor([[3, 100]]), committed=torch.tensor([[False, True]]))
    assert "\033[1m" in render_step(tokenizer, step, 3, bold=True)
    assert "\033[" not in render_step(tokenizer, step, 3, bold=False)


def test_missing_optional_dependencies_are_named_up_front(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    assert main(["serve"]) == 2
    assert "pip install 'twotower[serve]'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--quick", "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_a_prompt_longer_than_the_model_was_trained_on_is_warned_about(tmp_path, capsys):
    folder = make_tiny_model_dir(tmp_path / "model", vocab_size=300)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["generate", "one two three four five six seven", "--model", str(folder), "--mode", "ar",
                 "--max-new-tokens", "4"]) == 0
    assert "exceed the model's max_position_embeddings (8)" in capsys.readouterr().err


def test_convert_says_what_is_wrong(tmp_path, capsys):
    folder = make_tiny_model_dir(tmp_path / "two", vocab_size=300)
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "two-tower"]) == 2
    assert "source folder" in capsys.readouterr().err
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "two-tower"]) == 2
    assert "already a two-tower checkpoint; --to single-tower" in capsys.readouterr().err
    assert main(["convert", str(folder), str(tmp_path / "single"), "--to", "single-tower"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "single"), str(tmp_path / "out"), "--to", "single-tower"]) == 2
    assert "single-tower NemotronH checkpoint, not a two-tower one" in capsys.readouterr().err


def test_weights_get_the_normal_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        folder = make_tiny_model_dir(tmp_path / "model", vocab_size=300)
    finally:
        os.umask(old)
    assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)


def test_the_license_is_apache_2():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_subcommand_help_exits_cleanly(flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", flag])
    assert e.value.code == 0 and "--to" in capsys.readouterr().out


# every way of asking for help, each run in a fresh interpreter: what it printed, its exit status and
# which heavy libraries it loaded
HELP_PROBE = '''
import contextlib, io, json, sys
from twotower.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        code = main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
heavy = [m for m in ("torch", "transformers", "fastapi", "pydantic") if m in sys.modules]
print(json.dumps({"code": code, "out": buf.getvalue(), "heavy": heavy}))
'''


def probe_help(*args) -> dict:
    out = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_help_and_version_load_no_torch():
    from twotower.cli import COMMANDS
    top = probe_help("--help")
    assert top["code"] == 0 and top["heavy"] == [], top
    assert all(name in top["out"] for name in COMMANDS)
    version = probe_help("--version")
    assert version["code"] == 0 and version["out"].startswith("twotower ") and version["heavy"] == [], version
    for name in COMMANDS:
        result = probe_help(name, "--help")
        assert result["code"] == 0 and result["heavy"] == [], (name, result)
        assert result["out"].startswith(f"usage: twotower {name}") and COMMANDS[name][1] in result["out"]


def test_help_offers_every_mode_and_unmasking_rule(capsys):
    import twotower.two_tower  # noqa: F401  (registers the built-in modes)
    from twotower.choices import MODE_NAMES, UNMASKING_RULE_NAMES
    from twotower.modes import MODES
    from twotower.sampler import UNMASKING_RULES
    assert MODE_NAMES == tuple(MODES) and UNMASKING_RULE_NAMES == tuple(UNMASKING_RULES)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "{" + ",".join(MODES) + "}" in out and "{" + ",".join(UNMASKING_RULES) + "}" in out


def test_command_line_fields_are_the_library_s():
    from twotower.choices import DIFFUSION_CONFIG_FIELDS, WEIGHT_DTYPES
    from twotower.params import DiffusionParams
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in WEIGHT_DTYPES)
    types = {f.name: f.type for f in dataclasses.fields(DiffusionParams)}  # "int | None", as written
    assert all(types[name] == f"{kind.__name__} | None" for name, kind in DIFFUSION_CONFIG_FIELDS.items())


def test_the_package_imports_its_names_on_first_use():
    probe = """
import sys
import twotower
light = "torch" not in sys.modules
tasks = twotower.tasks.__name__  # a submodule, found on first use
names = {}
exec("from twotower import *", names)
print(light, tasks, sorted(set(names) - {"__builtins__"}) == sorted(twotower.__all__),
      twotower.TwoTowerForCausalLM.__module__, set(twotower.__all__) <= set(dir(twotower)),
      hasattr(twotower, "no_such_name"))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "twotower.tasks", "True", "twotower.two_tower", "True", "False"]
