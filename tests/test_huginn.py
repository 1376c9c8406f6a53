"""Huginn-0125 compatibility: conversion of the reference checkpoint format and logits parity with the reference."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from recurrent_lm import RecurrentLM
from recurrent_lm.huginn import NotAHuginnCheckpoint, convert_huginn_checkpoint

from .conftest import HUGINN_TINY

STEPS = (1, 2, 4, 8, 16)


@pytest.fixture(scope="module")
def model(huginn_dir):
    return RecurrentLM.from_pretrained(huginn_dir).eval()


@pytest.mark.parametrize("steps", STEPS)
def test_logits_match_reference_with_given_initial_state(model, huginn_cases, steps):
    with torch.no_grad():
        out = model(huginn_cases["input_ids"], num_steps=steps, initial_state=huginn_cases["input_states"])
    torch.testing.assert_close(out.logits, huginn_cases[f"logits_steps_{steps}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("steps", STEPS)
def test_logits_match_reference_with_zero_initial_state(model, huginn_cases, steps):
    with torch.no_grad():
        out = model(huginn_cases["input_ids"], num_steps=steps, init_scale=0.0)
    torch.testing.assert_close(out.logits, huginn_cases[f"logits_zero_state_steps_{steps}"], atol=1e-4, rtol=0)


def test_greedy_continuation_matches_reference(model, huginn_cases):
    ids = huginn_cases["input_ids"][:1]
    expected = huginn_cases["greedy_zero_state_steps_4"]
    with torch.no_grad():
        for _ in range(len(expected)):
            next_id = model(ids, num_steps=4, init_scale=0.0).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert ids[0, -len(expected):].tolist() == expected.tolist()


def test_converted_directory_loads_through_auto_class(huginn_dir):
    model = AutoModelForCausalLM.from_pretrained(huginn_dir)
    assert isinstance(model, RecurrentLM)
    assert model.config.num_core_layers == 2 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def test_sharded_checkpoint_converts_shard_by_shard(tmp_path, huginn_dir, huginn_cases):
    """A checkpoint split over several shards (as the real 7 GB one is) converts to the same model."""
    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copy(HUGINN_TINY / "config.json", src)
    weights = load_file(HUGINN_TINY / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, src / shard, metadata={"format": "pt"})
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    dst = convert_huginn_checkpoint(src, tmp_path / "out", dtype="float32")
    assert json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    sharded = RecurrentLM.from_pretrained(dst).eval()
    with torch.no_grad():
        out = sharded(huginn_cases["input_ids"], num_steps=4, initial_state=huginn_cases["input_states"])
    torch.testing.assert_close(out.logits, huginn_cases["logits_steps_4"], atol=1e-4, rtol=0)


def test_source_that_is_not_huginn_is_a_clear_error(tmp_path, huginn_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_huginn_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(NotAHuginnCheckpoint, match="no config.json"):
        convert_huginn_checkpoint(tmp_path, tmp_path / "out")
    # our own converted directory is a transformers checkpoint, but not a Huginn one
    with pytest.raises(NotAHuginnCheckpoint, match="is not a Huginn checkpoint: config.json lacks"):
        convert_huginn_checkpoint(huginn_dir, tmp_path / "out")


def test_missing_and_foreign_tensors_are_errors_and_leave_nothing_behind(tmp_path):
    weights = load_file(HUGINN_TINY / "model.safetensors")
    for case, tensors, message in [
        ("missing", {k: v for k, v in weights.items() if k != "transformer.adapter.weight"}, "lacks weights"),
        ("foreign", {**weights, "transformer.extra.weight": torch.zeros(2)}, "not a Huginn-0125 parameter"),
        ("shape", {**weights, "transformer.adapter.weight": torch.zeros(3, 3)}, "has shape"),
    ]:
        src = tmp_path / case
        src.mkdir()
        shutil.copy(HUGINN_TINY / "config.json", src)
        save_file(tensors, src / "model.safetensors")
        with pytest.raises(NotAHuginnCheckpoint, match=message):
            convert_huginn_checkpoint(src, tmp_path / f"{case}-out")
        assert not (tmp_path / f"{case}-out").exists()
        assert not list(tmp_path.glob(f".{case}-out.*")), "temporary directory left behind"


def test_pickled_weights_are_refused(tmp_path):
    shutil.copy(HUGINN_TINY / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(NotAHuginnCheckpoint, match="pickled weights are never loaded"):
        convert_huginn_checkpoint(tmp_path, tmp_path / "out")


def test_unsupported_variant_is_refused(tmp_path):
    config = json.loads((HUGINN_TINY / "config.json").read_text())
    config["injection_type"] = "add"
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(HUGINN_TINY / "model.safetensors", tmp_path)
    with pytest.raises(NotAHuginnCheckpoint, match="injection_type"):
        convert_huginn_checkpoint(tmp_path, tmp_path / "out")


def test_existing_destination_needs_overwrite(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert_huginn_checkpoint(HUGINN_TINY, dst)
    convert_huginn_checkpoint(HUGINN_TINY, dst, overwrite=True)
    assert (dst / "model.safetensors").is_file() and not (dst / "keep.txt").exists()
