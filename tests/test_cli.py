"""The `rlm` command line."""

import subprocess
import sys

import torch

from recurrent_lm import RecurrentLM

from .conftest import HUGINN_TINY


def rlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recurrent_lm.cli", *args], capture_output=True, text=True)


def test_help_lists_subcommands():
    result = rlm("--help")
    assert result.returncode == 0 and "convert-huginn" in result.stdout


def test_convert_huginn_command(tmp_path, huginn_cases):
    result = rlm("convert-huginn", str(HUGINN_TINY), str(tmp_path / "out"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    model = RecurrentLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        logits = model(huginn_cases["input_ids"], num_steps=2, init_scale=0.0).logits
    torch.testing.assert_close(logits, huginn_cases["logits_zero_state_steps_2"], atol=1e-4, rtol=0)


def test_convert_huginn_bad_source_is_one_clear_line(tmp_path):
    result = rlm("convert-huginn", str(tmp_path), str(tmp_path / "out"))
    assert result.returncode != 0
    assert "is not a Huginn checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_convert_huginn_takes_a_yaml_config(tmp_path):
    config = tmp_path / "convert.yaml"
    config.write_text(f"src: {HUGINN_TINY}\ndst: {tmp_path / 'out'}\n")
    result = rlm("convert-huginn", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
