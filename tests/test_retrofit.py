"""Retrofitted recurrence: Llama-family checkpoints into RecurrentLM (parity at r = 1 per family), the recurrence
curriculum, adapter-only training, and a retrofitted model through training, generation and a depth sweep."""

import json
import math

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from recurrent_lm.cli import main
from recurrent_lm.depth import RecurrenceCurriculum, sample_num_steps
from recurrent_lm.flops import forward_flops
from recurrent_lm.loading import load_model
from recurrent_lm.retrofit import retrofit
from recurrent_lm.tasks import task_tokenizer
from train.cli import train_main
from train.module import RecurrentLMModule

from .test_train import logged

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # short, so that the test's positions reach the scaled band
SPLIT = dict(prelude=1, core=2, coda=1)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama-rope-scaled-tied": (LlamaConfig, LlamaForCausalLM, {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "llama-linear-rope": (LlamaConfig, LlamaForCausalLM, {"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                                          "rope_theta": 500.0}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 64}),
}


def tiny_source(path, family: str, layers: int = 4, vocab_size: int = 40, seed: int = 0):
    """A tiny random model of a family (GQA: 4 query heads, 2 key/value heads), saved as safetensors. Weights are
    perturbed off their init (norm gains of 1, zero biases) so that every parameter matters."""
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(vocab_size=vocab_size, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=48, num_hidden_layers=layers, max_position_embeddings=128,
                          rms_norm_eps=1e-5, **extra)
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_retrofit_keeps_the_source_model_exactly_at_one_step(tmp_path, family):
    """Every layer kept, the adapter passing the prelude's output through: logits at r = 1 equal the source's to
    1e-5 in float32 (with left padding too), and greedy generation is identical."""
    source = tiny_source(tmp_path / "src", family)
    model = load_model(retrofit(tmp_path / "src", tmp_path / "dst", prelude=1, core=2, coda=1))
    assert model.config.block_type == "pre_norm" and model.config.kv_heads == 2
    ids = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = source(ids).logits, model(ids, num_steps=1).logits
    assert (expected - got).abs().max() < 1e-5
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: both count positions over the real tokens
    with torch.no_grad():
        expected = source(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got = model(ids, attention_mask=mask, num_steps=1).logits
    assert (expected - got)[mask.bool()].abs().max() < 1e-5
    prompt = ids[:, :6]
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(source.generate(prompt, **greedy), model.generate(prompt, num_steps=1, **greedy))
    if family == "llama-rope-scaled-tied":
        assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def test_a_layer_selection_matches_the_source_with_those_layers(tmp_path):
    """--layers picks and drops layers (the paper's TinyLlama (4, 8, 4) drops 4-9): r = 1 equals the source run
    through the picked layers only."""
    source = tiny_source(tmp_path / "src", "llama", layers=6)
    model = load_model(retrofit(tmp_path / "src", tmp_path / "dst", prelude=1, core=2, coda=1, layers="0,2-3,5"))
    assert json.loads((tmp_path / "dst" / "retrofit.json").read_text())["layers"] == [0, 2, 3, 5]
    source.model.layers = torch.nn.ModuleList(source.model.layers[i] for i in (0, 2, 3, 5))
    for index, layer in enumerate(source.model.layers):  # its cache and masks index layers by position
        layer.self_attn.layer_idx = index
    source.config.num_hidden_layers, source.config.layer_types = 4, ["full_attention"] * 4
    ids = torch.randint(0, 40, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (source(ids, use_cache=False).logits - model(ids, num_steps=1).logits).abs().max() < 1e-5


def test_skip_first_injection_keeps_one_step_exact_whatever_the_adapter(tmp_path):
    source = tiny_source(tmp_path / "src", "qwen2")
    model = load_model(retrofit(tmp_path / "src", tmp_path / "dst", prelude=1, core=2, coda=1, skip_first_injection=True))
    with torch.no_grad():
        model.adapter.weight.normal_()  # as if trained
        ids = torch.randint(0, 40, (1, 10))
        assert (source(ids).logits - model(ids, num_steps=1).logits).abs().max() < 1e-5
        assert (source(ids).logits - model(ids, num_steps=2).logits).abs().max() > 1e-3
    # FLOPs: the first step runs no adapter (d^2 per token saved)
    config, with_adapter = model.config, dict(model.config.to_dict(), skip_first_injection=False)
    d = config.hidden_size
    plain = type(config)(**{k: v for k, v in with_adapter.items() if k in type(config).__dataclass_fields__})
    assert forward_flops(plain, 3).flops - forward_flops(config, 3).flops == 2 * d * d


def test_bad_sources_and_splits_are_one_line_errors(tmp_path, capsys):
    tiny_source(tmp_path / "src", "llama")
    cases = [
        (["--prelude", "1", "--core", "1", "--coda", "1"], "does not add up to the source's 4 layers"),
        (["--prelude", "1", "--core", "2", "--coda", "1", "--layers", "0-2"], "picks 3 layers"),
        (["--prelude", "1", "--core", "2", "--coda", "1", "--layers", "0-2,9"], "layer 9 does not exist"),
        (["--prelude", "1", "--core", "0", "--coda", "1"], "--core must be >= 1, got 0"),
    ]
    for options, message in cases:
        with pytest.raises(SystemExit) as error:
            main(["retrofit", str(tmp_path / "src"), str(tmp_path / "dst"), *options])
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' model; rlm retrofit supports .*llama, mistral, qwen2"):
        retrofit(gpt2, tmp_path / "x", **SPLIT)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="only pickled pytorch_model.bin.*never unpickles"):
        retrofit(pickled, tmp_path / "x", **SPLIT)
    biased = tmp_path / "biased"
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, num_attention_heads=2, intermediate_size=8,
                                        num_hidden_layers=2, attention_bias=True))
    tiny.save_pretrained(biased)
    with pytest.raises(ValueError, match="uses attention_bias"):
        retrofit(biased, tmp_path / "x", prelude=0, core=1, coda=1)
    retrofit(tmp_path / "src", tmp_path / "dst", **SPLIT)
    with pytest.raises(FileExistsError, match="already exists"):
        retrofit(tmp_path / "src", tmp_path / "dst", **SPLIT)


def test_the_curriculum_ramps_the_mean_depth_on_its_schedule():
    curriculum = RecurrenceCurriculum(start=1, share=0.5, shape="1-sqrt")
    assert curriculum.mean_at(0.0, 5) == 1
    assert curriculum.mean_at(0.25, 5) == pytest.approx(1 + 4 * (1 - math.sqrt(0.5)))
    assert curriculum.mean_at(0.5, 5) == curriculum.mean_at(0.9, 5) == 5
    assert RecurrenceCurriculum(2, 1.0, "linear").mean_at(0.5, 4) == 3
    assert RecurrenceCurriculum(1, 1.0, "cosine").mean_at(0.5, 3) == pytest.approx(2)
    with pytest.raises(ValueError, match="recurrence_curriculum"):
        RecurrenceCurriculum(start=0.5)
    # the draws follow the scheduled mean: E[r] = mean for the Poisson log-normal draw
    generator = torch.Generator().manual_seed(0)
    for mean in (1.0, 2.5, 4.0):
        draws = [sample_num_steps(mean, 100, generator).total for _ in range(20000)]
        assert sum(draws) / len(draws) == pytest.approx(mean, abs=0.05)


def test_a_retrofitted_model_trains_with_the_curriculum_and_works_downstream(tmp_path):
    """configs/retrofit-llama.yaml on a tiny random Llama with the permutation task's tokenizer: the architecture
    comes from the retrofitted model, the logged mean depth follows the curriculum, the loss falls, and the exported
    model generates and sweeps depth like any RecurrentLM."""
    tokenizer = task_tokenizer(["permutation"])
    tiny_source(tmp_path / "src", "llama", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "src")
    retrofitted = retrofit(tmp_path / "src", tmp_path / "retrofitted", **SPLIT, mean_recurrence=3)
    root = tmp_path / "run"
    train_main(["--config", "retrofit-llama", "--model.init_from", str(retrofitted), "--data.tokenizer",
                str(retrofitted), "--trainer.max_steps", "16", "--trainer.val_check_interval", "16",
                "--data.batch_size", "16", "--model.warmup_steps", "2", "--model.learning_rate", "3e-3",
                "--data.val_problems_per_difficulty", "2", "--trainer.log_every_n_steps", "1",
                "--model.eval_depths", "[1,2]", "--trainer.default_root_dir", str(root),
                "--trainer.logger.init_args.save_dir", str(root)])
    means = [mean for _, mean in logged(root, "train/mean_recurrence")]
    expected = [RecurrenceCurriculum(1, 0.75, "1-sqrt").mean_at(step / 16, 3) for step in range(16)]
    assert means == pytest.approx(expected, abs=1e-5)
    losses = [loss for _, loss in logged(root, "train/loss")]
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    trained = load_model(root / "model")
    assert trained.config.block_type == "pre_norm" and not trained.config.latent_norm
    assert not torch.equal(trained.adapter.weight, load_model(retrofitted).adapter.weight)
    main(["sweep", "--model", str(root / "model"), "--task", "permutation", "--difficulties", "1", "--n", "2",
          "--steps", "1,2", "--exit_criteria", "[kl]", "--exit_thresholds", "[0.01]", "--out", str(tmp_path / "sweep")])
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {"latent", "latent-exit", "latent-oracle"}
    # and on one FLOPs axis against a chain of thought (here the same model, thinking within a budget)
    main(["compare", "--latent", str(root / "model"), "--cot", str(root / "model"), "--task", "permutation",
          "--difficulties", "1", "--n", "2", "--steps", "1,2", "--budgets", "4", "--votes", "1",
          "--methods", "latent,budget", "--exit_criterion", "kl", "--out", str(tmp_path / "compare")])
    methods = {row["method"] for row in json.loads((tmp_path / "compare" / "results.json").read_text())["rows"]}
    assert {"latent", "cot-budget"} <= methods, methods


def test_trainable_names_what_trains(tmp_path):
    tokenizer = task_tokenizer(["permutation"])
    tiny_source(tmp_path / "src", "qwen2", vocab_size=len(tokenizer))
    retrofitted = retrofit(tmp_path / "src", tmp_path / "retrofitted", **SPLIT)
    module = RecurrentLMModule(None, init_from=str(retrofitted), trainable=["adapter"])
    trainable = [name for name, p in module.model.named_parameters() if p.requires_grad]
    assert trainable == ["adapter.weight"]
    module = RecurrentLMModule(None, init_from=str(retrofitted), trainable=["adapter", "core.1"])
    trainable = {name.split(".")[0] + (f".{name.split('.')[1]}" if name.startswith("core") else "")
                 for name, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {"adapter", "core.1"}
    with pytest.raises(ValueError, match=r"\['cores\.'\] names no parameter"):
        RecurrentLMModule(None, init_from=str(retrofitted), trainable=["cores"])
    # fields given beside init_from set training settings over its shape
    module = RecurrentLMModule({"mean_recurrence": 6}, init_from=str(retrofitted))
    assert module.model.config.mean_recurrence == 6 and module.model.config.block_type == "pre_norm"
    with pytest.raises(ValueError, match="model.architecture is missing"):
        RecurrentLMModule(None)
