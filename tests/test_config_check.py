"""A model's config and weights are checked where they are read: a config.json that does not parse, a field that is
missing, ill-typed, out of range or not finite, and weights holding NaN or inf are each one line naming the file
and the field (or tensor), whether the model is loaded from Python or by an `rlm` command."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from recurrent_lm import RecurrentConfig, RecurrentLM
from recurrent_lm.loading import (load_any_causal_lm, load_config, load_model, load_tokenizer, model_type,
                                  require_finite_weights)
from recurrent_lm.recipes import checkpoint_names

from .conftest import weights_in_memory
from .test_cli import one_line_error, rlm, tiny_model_dir

NAN, INF = float("nan"), float("inf")


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# --- a config built in Python -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field, problem", [
    (dict(mean_recurrence="8"), "mean_recurrence", "mean_recurrence expected int, got str '8'"),
    (dict(mean_recurrence=8.0), "mean_recurrence", "mean_recurrence expected int, got float 8.0"),
    (dict(use_rope="yes"), "use_rope", "use_rope expected bool, got str 'yes'"),
    (dict(num_prelude_layers=-1), "num_prelude_layers", "num_prelude_layers must be >= 0, got -1"),
    (dict(num_attention_heads=3), "num_attention_heads",
     "hidden_size (64) is not divisible by num_attention_heads (3)"),
    (dict(block_type="post_norm"), "block_type", "block_type must be one of sandwich, pre_norm, got 'post_norm'"),
    (dict(rope_theta=NAN), "rope_theta", "rope_theta must be a finite number > 0, got nan"),
    (dict(rope_theta=INF), "rope_theta", "rope_theta must be a finite number > 0, got inf"),
    (dict(rms_norm_eps=NAN), "rms_norm_eps", "rms_norm_eps must be a finite number > 0, got nan"),
    (dict(init_scale=NAN), "init_scale", "init_scale must be a finite number >= 0, got nan"),
    (dict(init_scale=-INF), "init_scale", "init_scale must be a finite number >= 0, got -inf"),
    (dict(initializer_range=NAN), "initializer_range", "initializer_range must be a finite number > 0, got nan"),
    (dict(rope_scaling={"rope_type": "linear", "factor": NAN}), "rope_scaling",
     "rope_scaling['factor'] must be a finite number > 0, got nan"),
    (dict(rope_scaling={"rope_type": "linear", "factor": "2"}), "rope_scaling",
     "rope_scaling['factor'] must be a finite number > 0, got '2'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64}), "rope_scaling",
     "rope_scaling's high_freq_factor (4.0) must exceed its low_freq_factor (4.0)"),
])
def test_a_bad_field_is_a_one_line_value_error_naming_it(overrides, field, problem):
    with pytest.raises(ValueError) as error:
        RecurrentConfig.preset("debug", **overrides)
    assert one_line(error) == f"RecurrentConfig: field {field!r}: {problem}"


def test_nan_is_refused_without_a_preset_too():
    with pytest.raises(ValueError, match="field 'rope_theta'"):
        RecurrentConfig(rope_theta=NAN)


def test_a_bad_value_assigned_later_is_the_same_error():
    config = RecurrentConfig.preset("debug")
    with pytest.raises(ValueError) as error:
        config.num_core_layers = "3"
    assert one_line(error) == "RecurrentConfig: field 'num_core_layers': num_core_layers expected int, got str '3'"


def test_an_int_for_a_float_field_is_that_float():  # JSON and YAML write 10000 for 10000.0
    theta = RecurrentConfig.preset("debug", rope_theta=10000).rope_theta
    assert theta == 10000.0 and isinstance(theta, float)


# --- a config.json --------------------------------------------------------------------------------------------------


def edited_config(model_dir, **edits):
    """Rewrite the model directory's config.json with fields changed (None: removed)."""
    config = json.loads((model_dir / "config.json").read_text())
    config.update(edits)
    config = {name: value for name, value in config.items() if value is not None}
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir / "config.json"


LOADERS = {"RecurrentConfig.from_pretrained": RecurrentConfig.from_pretrained,
           "RecurrentLM.from_pretrained": RecurrentLM.from_pretrained,
           "AutoModelForCausalLM.from_pretrained": AutoModelForCausalLM.from_pretrained,
           "load_config": load_config, "load_model": load_model, "load_any_causal_lm": load_any_causal_lm}


@pytest.mark.parametrize("edits, field, problem", [
    (dict(mean_recurrence="8"), "mean_recurrence", "mean_recurrence expected int, got str '8'"),
    (dict(num_core_layers=2.0), "num_core_layers", "num_core_layers expected int, got float 2.0"),
    (dict(num_coda_layers=-1), "num_coda_layers", "num_coda_layers must be >= 0, got -1"),
    (dict(num_attention_heads=3), "num_attention_heads",
     "hidden_size (64) is not divisible by num_attention_heads (3)"),
    (dict(rope_theta=NAN), "rope_theta", "rope_theta must be a finite number > 0, got nan"),  # a bare NaN literal
    (dict(init_scale={"__float__": "Infinity"}), "init_scale",  # transformers' own spelling of inf
     "init_scale must be a finite number >= 0, got inf"),
    (dict(hidden_size=None), "hidden_size", "hidden_size is missing (the default, 5280, is Huginn-0125's, not this "
                                            "model's)"),
])
def test_a_bad_field_in_config_json_names_the_file_and_the_field(tmp_path, edits, field, problem):
    model_dir = tiny_model_dir(tmp_path)
    file = edited_config(model_dir, **edits)
    for name, load in LOADERS.items():
        with pytest.raises(ValueError) as error:
            load(model_dir)
        assert one_line(error) == f"{file}: field {field!r}: {problem}", name


@pytest.mark.parametrize("contents, problem", [
    (b"", "is not valid JSON (line 1 column 1: Expecting value)"),
    (b'{"model_type": "recurrent_lm",', "is not valid JSON (line 1 column 31: Expecting property name enclosed in "
                                        "double quotes)"),
    (b"\x89PNG\r\n\x1a\n\x00\xff", "is not valid JSON (byte 0 is not text: invalid start byte)"),
    (b"[1, 2]", "is not valid config JSON: it holds a list, not an object"),
])
def test_a_config_json_that_does_not_parse_is_named(tmp_path, contents, problem):
    model_dir = tiny_model_dir(tmp_path)
    (model_dir / "config.json").write_bytes(contents)
    for load in (RecurrentConfig.from_pretrained, RecurrentLM.from_pretrained, model_type, load_config, load_model,
                 load_any_causal_lm, load_tokenizer):
        with pytest.raises(ValueError) as error:
            load(model_dir)
        assert one_line(error) == f"{model_dir / 'config.json'} {problem}", load


def test_shipped_checkpoints_still_load_their_configs():  # written before some fields existed: those take defaults
    from recurrent_lm.recipes import checkpoints_dir

    whole = [name for name in checkpoint_names() if (checkpoints_dir() / name / "config.json").is_file()]
    assert len(whole) >= 7 and all(load_config(name).num_core_layers >= 1 for name in whole)


# --- the command line -----------------------------------------------------------------------------------------------


def rlm_loading(command: str, model_dir, out):
    """`rlm COMMAND --model DIR` with the least work past loading the model."""
    options = {"generate": ["--prompt", "ab"],
               "sweep": ["--task", "parity", "--n", "1", "--steps", "1", "--out", str(out)]}
    return rlm(command, "--model", str(model_dir), *options[command])


@pytest.mark.parametrize("command", ["generate", "sweep"])
def test_rlm_refuses_a_bad_config_json_in_one_line(tmp_path, command):
    model_dir = tiny_model_dir(tmp_path)
    file = edited_config(model_dir, num_attention_heads=3)
    one_line_error(rlm_loading(command, model_dir, tmp_path / "out1"), f"rlm {command}: error: {file}: field "
                   "'num_attention_heads': hidden_size (64) is not divisible by num_attention_heads (3)")
    file.write_text("")
    one_line_error(rlm_loading(command, model_dir, tmp_path / "out2"),
                   f"rlm {command}: error: {file} is not valid JSON (line 1 column 1: Expecting value)")


# --- weights --------------------------------------------------------------------------------------------------------


def poisoned(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The model with three values of one tensor made NaN, inf and -inf, as a diverged run leaves them."""
    with torch.no_grad():
        model.get_parameter(name).view(-1)[:3] = torch.tensor([NAN, INF, -INF])
    return model


def test_non_finite_weights_are_refused_in_one_line(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    model = RecurrentLM.from_pretrained(model_dir)
    require_finite_weights(model, model_dir)  # a healthy model passes
    size = model.get_parameter("prelude.0.attn.qkv.weight").numel()
    poisoned(model, "prelude.0.attn.qkv.weight").save_pretrained(model_dir)
    message = (f"{model_dir} holds non-finite weights (prelude.0.attn.qkv.weight: 3 NaN/inf values of {size}): the "
               "run that wrote it diverged")
    for load in (load_model, load_any_causal_lm):
        with pytest.raises(ValueError) as error:
            load(model_dir)
        assert one_line(error) == message
    result = rlm("generate", "--model", str(model_dir), "--prompt", "ab")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"rlm generate: error: {message}"  # after transformers' load bar


def test_non_finite_weights_are_refused_in_a_state_dict_and_any_causal_lm(tmp_path):
    state = {"fine": torch.zeros(2), "steps": torch.tensor([3]), "bad": torch.tensor([1.0, NAN], dtype=torch.bfloat16)}
    with pytest.raises(ValueError) as error:
        require_finite_weights(state, "run.ckpt")
    assert one_line(error) == ("run.ckpt holds non-finite weights (bad: 1 NaN/inf values of 2): the run that wrote "
                               "it diverged")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    poisoned(llama, "model.layers.0.mlp.up_proj.weight").save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"llama holds non-finite weights \(model.layers.0.mlp.up_proj.weight: 3 "):
        load_any_causal_lm(tmp_path / "llama")


# --- a directory whose parts disagree, or are damaged ----------------------------------------------------------------


def test_a_config_that_does_not_match_its_weights_or_lacks_model_type_is_named(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    file = edited_config(model_dir, vocab_size=8)  # the tokenizer's ids no longer fit: said first
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "ab"), "past the model's vocab_size (8)")
    edited_config(model_dir, vocab_size=64)
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "ab"),
                   f"{file} does not match the weights: embed_tokens.weight is [")
    edited_config(model_dir, vocab_size=48, intermediate_size=10**9)  # the meta device allocates nothing
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "ab"), f"{file} does not match the weights")
    file.write_text("{}")
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "ab"),
                   f"{file}: field 'model_type' is missing")


def test_a_bad_dtype_and_a_damaged_tokenizer_are_named(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    tokenizer = model_dir / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:100])
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "ab"), f"{tokenizer} (or the tokenizer")
    file = edited_config(model_dir, dtype="float99")
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "ab"),
                   f"{file}: field 'dtype': dtype 'float99' is not a torch dtype")


def test_a_huginn_config_is_named_in_its_own_fields(tmp_path):
    import shutil

    from .conftest import HUGINN_TINY

    source = tmp_path / "huginn"
    shutil.copytree(HUGINN_TINY, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "n_embd": -5}))
    one_line_error(rlm("convert-huginn", str(source), str(tmp_path / "out")),
                   f"{source / 'config.json'}: field 'n_embd': hidden_size must be at least 1, got -5")


def test_a_checkpoint_that_is_no_checkpoint_or_holds_non_finite_weights_is_named(tmp_path):
    from .test_train import quick_train

    text = tmp_path / "config.yaml"
    text.write_text("model:\n  a: 1\n")
    one_line_error(rlm("export", str(text), str(tmp_path / "out")), f"{text} is not a checkpoint")
    root = tmp_path / "run"
    assert quick_train("--trainer.default_root_dir", str(root)).returncode == 0
    last = root / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    next(iter(state["state_dict"].values())).view(-1)[0] = float("inf")
    torch.save(state, last)
    one_line_error(quick_train("--trainer.default_root_dir", str(root), "--ckpt_path", "last",
                               "--trainer.max_steps", "4"), f"{last} holds non-finite weights")


def test_weights_with_missing_or_extra_tensors_and_a_tokenizer_of_another_model_are_named(tmp_path):
    from safetensors.torch import save_file

    model_dir = tiny_model_dir(tmp_path)
    weights = model_dir / "model.safetensors"
    tensors = weights_in_memory(weights)
    save_file({k: v for k, v in tensors.items() if k != "adapter.weight"}, weights, metadata={"format": "pt"})
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "ab"), "lacks ['adapter.weight']")
    save_file({**tensors, "bogus.weight": torch.zeros(2)}, weights, metadata={"format": "pt"})
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "ab"), "has no place for, ['bogus.weight']")
    save_file(tensors, weights, metadata={"format": "pt"})
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = {token: i + 100 for token, i in tokenizer["model"]["vocab"].items()}
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "", "--max-new-tokens", "1"),
                   "past the model's vocab_size")


def test_convert_huginn_refuses_integer_dtypes_and_non_finite_weights(tmp_path):
    import shutil

    from safetensors.torch import save_file

    from .conftest import HUGINN_TINY

    one_line_error(rlm("convert-huginn", str(HUGINN_TINY), str(tmp_path / "int"), "--dtype", "int8"),
                   "--dtype 'int8' is not a floating-point torch dtype")
    source = tmp_path / "huginn"
    shutil.copytree(HUGINN_TINY, source)
    shard = source / "model.safetensors"
    tensors = weights_in_memory(shard)
    tensors["transformer.ln_f.weight"].view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    one_line_error(rlm("convert-huginn", str(source), str(tmp_path / "out")), "holds non-finite weights")
    assert not (tmp_path / "out").exists()


def test_integer_weights_and_broken_generation_or_tokenizer_configs_are_named(tmp_path):
    from safetensors.torch import save_file

    model_dir = tiny_model_dir(tmp_path)
    weights = model_dir / "model.safetensors"
    tensors = weights_in_memory(weights)
    save_file({**tensors, "adapter.weight": tensors["adapter.weight"].to(torch.int32)}, weights,
              metadata={"format": "pt"})
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "ab"),
                   "holds non-floating-point weights: ['adapter.weight']")
    save_file(tensors, weights, metadata={"format": "pt"})
    generation = model_dir / "generation_config.json"
    generation.write_text('{"max_new_tokens": -5')
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "ab"), f"{generation} is not valid JSON")
    generation.unlink()
    tokenizer_config = model_dir / "tokenizer_config.json"
    tokenizer_config.write_text("[1,2")
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "ab"), f"{tokenizer_config} is not valid")


def test_a_special_token_id_outside_the_vocabulary_is_named(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    file = edited_config(model_dir, eos_token_id=99999)
    one_line_error(rlm("generate", "--model", str(model_dir), "--prompt", "ab"),
                   f"{file}: field 'eos_token_id': 99999 is outside the vocabulary [0,")
