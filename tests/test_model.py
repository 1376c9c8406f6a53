"""The recurrent-depth model: forward semantics, depth sampling, truncated backprop, masks, I/O and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from recurrent_lm import RecurrentConfig, RecurrentLM, sample_num_steps
from recurrent_lm.cache import CACHE_NAME
from recurrent_lm.depth import resolve_num_steps


def ids(batch=2, seq=10, vocab=256, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --- num_steps -------------------------------------------------------------------------------------------------


def test_num_steps_forms():
    assert resolve_num_steps(3) == (0, 3)
    assert resolve_num_steps(torch.tensor(5)) == (0, 5)
    assert resolve_num_steps((2, 1)) == (2, 1)
    assert resolve_num_steps(torch.tensor([4, 2])) == (4, 2)
    assert resolve_num_steps((0, 1)) == (0, 1)


@pytest.mark.parametrize("bad, error, message", [
    (0, ValueError, "num_steps must be >= 1"),
    (-2, ValueError, ">= 0"),
    (2.5, TypeError, "must be an integer"),
    (True, TypeError, "must be an integer"),
    (torch.tensor(2.0), TypeError, "0-d integer tensor"),
    ((0, 0), ValueError, "at least 1 step"),
    ((1, 2, 3), ValueError, "pair"),
])
def test_bad_num_steps_are_clear_errors(tiny_model, bad, error, message):
    with pytest.raises(error, match=message):
        tiny_model(ids(), num_steps=bad)


def test_eval_default_depth_is_mean_recurrence(tiny_model):
    out = tiny_model(ids(), output_latent_states=True)
    assert out.num_steps == (0, tiny_model.config.mean_recurrence)
    assert len(out.latent_states) == tiny_model.config.mean_recurrence


def test_zero_d_tensor_num_steps_gives_same_logits_as_int(tiny_model):
    with torch.no_grad():
        a = tiny_model(ids(), num_steps=3, init_scale=0.0).logits
        b = tiny_model(ids(), num_steps=torch.tensor(3), init_scale=0.0).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- training-time depth sampling ------------------------------------------------------------------------------


def test_depth_distribution_has_configured_mean_and_split():
    generator = torch.Generator().manual_seed(123)
    draws = [sample_num_steps(8, 3, generator) for _ in range(20000)]
    depths = torch.tensor([n + k for n, k in draws], dtype=torch.float64)
    # the mean of 20k draws has a standard error of ~0.03 here: 0.15 is a 5-sigma band
    assert abs(depths.mean().item() - 8) < 0.15
    assert depths.min() >= 1 and depths.max() > 16  # heavy right tail: some draws go far past the mean
    assert all(k == min(3, n + k) and n == max(n + k - 3, 0) for n, k in draws)
    assert all(sample_num_steps(1, 1, generator) == (0, 1) for _ in range(10))


def test_training_draws_are_seeded_and_identical_across_replicas(tiny_config):
    """Without num_steps, a model in training mode draws its depth from the forward's generator: the model keeps
    no random source of its own, so replicas given equally seeded generators draw alike."""
    a, b = RecurrentLM(tiny_config).train(), RecurrentLM(tiny_config).train()

    def draws(model, seed):
        generator = torch.Generator().manual_seed(seed)
        return [model(ids(seq=4), generator=generator).num_steps for _ in range(12)]

    draws_a = draws(a, 7)
    draws_b = draws(b, 7)
    assert draws_a == draws_b
    assert len(set(draws_a)) > 1, "training depth should vary from call to call"
    assert draws(a, 8) != draws_a


def test_random_initial_state_is_reproducible_with_a_generator(tiny_model):
    x = ids()
    with torch.no_grad():
        first = tiny_model(x, num_steps=2, generator=torch.Generator().manual_seed(1)).logits
        again = tiny_model(x, num_steps=2, generator=torch.Generator().manual_seed(1)).logits
        other = tiny_model(x, num_steps=2, generator=torch.Generator().manual_seed(2)).logits
        zero_a = tiny_model(x, num_steps=2, init_scale=0.0).logits
        zero_b = tiny_model(x, num_steps=2, init_scale=0.0).logits
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)
    torch.testing.assert_close(zero_a, zero_b, rtol=0, atol=0)


# --- truncated backprop --------------------------------------------------------------------------------------


def test_gradients_reach_only_the_last_k_steps(tiny_model):
    """(n, k) must equal: n steps with no graph at all, then k differentiable steps from that state."""
    tiny_model.train()
    x = ids()
    start = torch.randn(2, 10, tiny_model.config.hidden_size)
    out = tiny_model(x, labels=x, num_steps=(3, 2), initial_state=start, output_latent_states=True)
    assert [s.requires_grad for s in out.latent_states] == [False, False, False, True, True]
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()

    ref = tiny_model(x, labels=x, num_steps=(0, 2), initial_state=out.latent_states[2])
    ref.loss.backward()
    for name, p in tiny_model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert grads["adapter.weight"].abs().sum() > 0


def test_int_num_steps_backpropagates_through_every_step(tiny_model):
    tiny_model.train()
    out = tiny_model(ids(), num_steps=3, output_latent_states=True)
    assert all(s.requires_grad for s in out.latent_states)


# --- outputs ---------------------------------------------------------------------------------------------------


def test_labels_loss_is_shifted_cross_entropy_ignoring_minus_100(tiny_model):
    x = ids()
    labels = x.clone()
    labels[:, :4] = -100
    out = tiny_model(x, labels=labels, num_steps=2, init_scale=0.0)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_per_step_latents_and_logit_lens(tiny_model):
    with torch.no_grad():
        out = tiny_model(ids(), num_steps=4, init_scale=0.0, output_latent_states=True, output_step_logits=True)
        two = tiny_model(ids(), num_steps=2, init_scale=0.0)
    assert len(out.latent_states) == len(out.step_logits) == 4
    torch.testing.assert_close(out.latent_states[-1], out.latent_state)
    torch.testing.assert_close(out.step_logits[-1], out.logits)
    torch.testing.assert_close(out.step_logits[1], two.logits)  # the lens at step 2 is the depth-2 model


def test_logits_to_keep(tiny_model):
    with torch.no_grad():
        full = tiny_model(ids(), num_steps=2, init_scale=0.0).logits
        last = tiny_model(ids(), num_steps=2, init_scale=0.0, logits_to_keep=1).logits
    torch.testing.assert_close(last, full[:, -1:])


# --- attention mask --------------------------------------------------------------------------------------------


def test_left_padded_batch_matches_each_sequence_alone(tiny_model):
    lengths = [10, 6, 3]
    rows = [ids(1, n, seed=n)[0] for n in lengths]
    batch = torch.zeros(3, 10, dtype=torch.long)
    mask = torch.zeros(3, 10, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, 10 - len(row):] = row
        mask[i, 10 - len(row):] = 1
    with torch.no_grad():
        padded = tiny_model(batch, attention_mask=mask, num_steps=3, init_scale=0.0).logits
        assert torch.isfinite(padded).all()
        for i, row in enumerate(rows):
            alone = tiny_model(row[None], num_steps=3, init_scale=0.0).logits[0]
            torch.testing.assert_close(padded[i, 10 - len(row):], alone, atol=1e-5, rtol=1e-5)


def test_all_ones_mask_changes_nothing(tiny_model):
    x = ids()
    with torch.no_grad():
        a = tiny_model(x, num_steps=2, init_scale=0.0).logits
        b = tiny_model(x, attention_mask=torch.ones_like(x), num_steps=2, init_scale=0.0).logits
    torch.testing.assert_close(a, b)


# --- bad input ---------------------------------------------------------------------------------------------------


def test_token_ids_outside_vocabulary(tiny_model):
    x = ids()
    x[1, 3] = 256
    with pytest.raises(ValueError, match=r"token id 256 is outside the vocabulary \[0, 256\)"):
        tiny_model(x, num_steps=1)
    x[1, 3] = -1
    with pytest.raises(ValueError, match="token id -1"):
        tiny_model(x, num_steps=1)


def test_sequence_longer_than_position_limit(tiny_model):
    limit = tiny_model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds max_position_embeddings = {limit}"):
        tiny_model(ids(1, limit + 1), num_steps=1)


def test_mask_of_wrong_shape(tiny_model):
    with pytest.raises(ValueError, match="attention_mask must be"):
        tiny_model(ids(), attention_mask=torch.ones(2, 3), num_steps=1)


def test_misspelt_forward_argument(tiny_model):
    with pytest.raises(TypeError, match="num_step"):
        tiny_model(ids(), num_step=3)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=66), "not divisible by num_attention_heads"),
    (dict(num_core_layers=0), "needs a core"),
    (dict(num_prelude_layers=-1), "num_prelude_layers must be >= 0"),
    (dict(mean_recurrence=0), "mean_recurrence must be at least 1"),
    (dict(init_scale=-1.0), "init_scale"),
    (dict(hidden_size=60, num_attention_heads=4, use_rope=True, qk_bias=False), "head_dim"),
    (dict(hidden_size="64"), "expected int"),
])
def test_invalid_configs(overrides, message):
    with pytest.raises(Exception, match=message):
        RecurrentConfig.preset("debug", **overrides)


def test_backprop_depth_above_mean_is_allowed():
    config = RecurrentConfig.preset("debug", mean_recurrence=2, mean_backprop_depth=6)
    n, k = sample_num_steps(config.mean_recurrence, config.mean_backprop_depth, torch.Generator().manual_seed(0))
    assert n == 0 and k >= 1  # every drawn step then gets gradients


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        RecurrentConfig.preset("nope")


# --- save / load -----------------------------------------------------------------------------------------------


def test_save_load_round_trip_with_auto_classes(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RecurrentConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RecurrentLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids(), num_steps=3, init_scale=0.0).logits,
                                   tiny_model(ids(), num_steps=3, init_scale=0.0).logits, rtol=0, atol=0)


def test_untied_head_round_trip(tmp_path):
    model = RecurrentLM(RecurrentConfig.preset("debug", tie_word_embeddings=False))
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = RecurrentLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_checkpoint_that_does_not_match_its_config_is_an_error(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    config = RecurrentConfig.from_pretrained(tmp_path)
    config.num_core_layers = 3  # the checkpoint has 2 core layers: core.2.* would be missing
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match its config.*missing"):
        RecurrentLM.from_pretrained(tmp_path)
    config.num_core_layers, config.intermediate_size = 2, 128
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match its config"):
        RecurrentLM.from_pretrained(tmp_path)


def test_init_scales_output_projections_by_depth(tiny_config):
    model = RecurrentLM(tiny_config)
    std = math.sqrt(2 / (5 * tiny_config.hidden_size))
    qkv, proj = model.core[0].attn.qkv.weight, model.core[0].attn.proj.weight
    assert abs(qkv.std().item() - std) / std < 0.1
    expected = std / math.sqrt(2 * tiny_config.num_hidden_layers)
    assert abs(proj.std().item() - expected) / expected < 0.15


def test_cached_continuation_matches_full_forward(tiny_model):
    x = ids(2, 12)
    with torch.no_grad():
        full = tiny_model(x, num_steps=3, init_scale=0.0).logits
        prefix = tiny_model(x[:, :8], num_steps=3, init_scale=0.0, use_cache=True)
        cache = prefix[CACHE_NAME]  # the output's cache field: `cache` from transformers 5.24 on, else past_key_values
        rest = tiny_model(x[:, 8:], num_steps=3, init_scale=0.0, cache=cache)
    torch.testing.assert_close(rest.logits, full[:, 8:], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 12


def test_huginn_0125_shape_has_the_published_parameter_counts():
    with torch.device("meta"):
        model = RecurrentLM(RecurrentConfig())
    total = sum(p.numel() for p in model.parameters())
    core = sum(p.numel() for p in model.core.parameters())
    assert 3.4e9 < total < 3.6e9 and 1.55e9 < core < 1.6e9


def test_compiled_blocks_have_no_graph_breaks_and_serve_every_depth_with_one_graph():
    """train.parallel.compile_blocks: each block compiles whole (torch._dynamo.explain: zero graph breaks, the host
    syncs stay outside) and the graphs made at the first depths serve every later depth, forward and backward,
    with no recompilation; the compiled model computes what the eager one does."""
    import copy

    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from recurrent_lm.model import rope_angles
    from recurrent_lm.train.parallel import compile_blocks

    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig.preset("debug", vocab_size=48)).train()
    rope = rope_angles(torch.arange(16).expand(2, -1), model.config.head_dim, model.config.rope_theta)
    explained = dynamo.explain(model.core[0])(torch.randn(2, 16, 64), rope, None, None, None, None)
    assert explained.graph_break_count == 0, explained.break_reasons
    dynamo.reset()
    counters.clear()
    compiled = compile_blocks(copy.deepcopy(model), backend="aot_eager")
    ids = torch.randint(0, 48, (2, 16))
    for depth in [(0, 1), (1, 2)]:  # with and without gradient
        compiled(ids, labels=ids, num_steps=depth, init_scale=0.0).loss.backward()
    graphs = counters["stats"]["unique_graphs"]
    for depth in [(3, 2), (0, 5), (8, 1), 7]:
        compiled(ids, labels=ids, num_steps=depth, init_scale=0.0).loss.backward()
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"], dict(counters["recompiles"])
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, num_steps=6, init_scale=0.0).logits,
                                   model(ids, num_steps=6, init_scale=0.0).logits, rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_and_compile_work_together_in_torchtitans_order():
    """train.parallel.prepare_model: the core blocks are checkpointed first, then every block is compiled (the
    compiled module is the checkpoint wrapper, so the graph holds the recomputation), each once however often it
    is called; a training step gives the eager model's loss and gradients."""
    import copy

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from recurrent_lm.train.parallel import prepare_model

    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig.preset("debug", vocab_size=48)).train()
    prepared = copy.deepcopy(model)
    prepare_model(prepared, activation_checkpointing=True, compile=True)
    prepare_model(prepared, activation_checkpointing=True, compile=True)  # Lightning may configure twice
    for block in prepared.core:
        assert isinstance(block, CheckpointWrapper) and not isinstance(block._checkpoint_wrapped_module,
                                                                       CheckpointWrapper)
        assert block._compiled_call_impl is not None  # compiled around the checkpointing
    assert all(b._compiled_call_impl is not None for b in [*prepared.prelude, *prepared.coda])
    ids = torch.randint(0, 48, (2, 16))
    losses = []
    for m in (model, prepared):
        loss = m(ids, labels=ids, num_steps=(1, 2), init_scale=0.0).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), prepared.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
