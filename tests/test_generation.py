"""Inference: the (layer, step) cache, generation with depth control, adaptive exit, continuous CoT and
self-speculative decoding."""

import inspect

import pytest
import torch
from transformers import TextStreamer

from recurrent_lm import RecurrentCache, RecurrentConfig, RecurrentLM, character_tokenizer
from recurrent_lm.cache import CACHE_NAME


@pytest.fixture(scope="module")
def huginn(huginn_dir):
    return RecurrentLM.from_pretrained(huginn_dir).eval()


def prompt(batch=1, length=6, seed=0):
    return torch.randint(5, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def recompute_greedy(model, ids, new_tokens, steps, attention_mask=None):
    """Reference: re-run the whole sequence without a cache for every new token."""
    for _ in range(new_tokens):
        mask = None if attention_mask is None else torch.cat(
            [attention_mask, attention_mask.new_ones(ids.shape[0], ids.shape[1] - attention_mask.shape[1])], 1)
        logits = model(ids, attention_mask=mask, num_steps=steps, init_scale=0.0).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


# --- cache --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4, 9])  # 9 > mean_recurrence: a DynamicCache would run out of slots
def test_cached_greedy_equals_recomputation(huginn, steps):
    ids = prompt()
    out = huginn.generate(ids, num_steps=steps, max_new_tokens=10, do_sample=False, init_scale=0.0)
    assert torch.equal(out, recompute_greedy(huginn, ids, 10, steps))


def test_generate_reproduces_reference_greedy_tokens(huginn, huginn_cases):
    ids = huginn_cases["input_ids"][:1]
    expected = huginn_cases["greedy_zero_state_steps_4"]
    out = huginn.generate(ids, num_steps=4, max_new_tokens=len(expected), do_sample=False, init_scale=0.0)
    assert out[0, ids.shape[1]:].tolist() == expected.tolist()


def test_left_padded_batch_generates_what_each_row_generates_alone(huginn):
    rows = [prompt(1, n, seed=n)[0] for n in (7, 4, 2)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 7 - len(row):], mask[i, 7 - len(row):] = row, 1
    out = huginn.generate(ids, attention_mask=mask, num_steps=3, max_new_tokens=6, do_sample=False, init_scale=0.0)
    for i, row in enumerate(rows):
        alone = huginn.generate(row[None], num_steps=3, max_new_tokens=6, do_sample=False, init_scale=0.0)
        assert out[i, 7:].tolist() == alone[0, len(row):].tolist()


def test_cache_grows_one_entry_per_step_and_ring_bounds_it(huginn):
    ids = prompt()
    full, ring = RecurrentCache(), RecurrentCache(core_slots=2)
    huginn.generate(ids, num_steps=8, max_new_tokens=4, do_sample=False, init_scale=0.0, past_key_values=full)
    huginn.generate(ids, num_steps=8, max_new_tokens=4, do_sample=False, init_scale=0.0, past_key_values=ring)
    config = huginn.config
    per_entry = 2 * config.hidden_size * 4  # keys and values, float32
    assert full.bytes_per_token() == per_entry * (config.num_prelude_layers + config.num_core_layers * 8 + config.num_coda_layers)
    assert ring.bytes_per_token() == per_entry * (config.num_prelude_layers + config.num_core_layers * 2 + config.num_coda_layers)


def test_ring_with_a_slot_per_step_is_the_full_cache(huginn):
    ids = prompt()
    full = huginn.generate(ids, num_steps=3, max_new_tokens=8, do_sample=False, init_scale=0.0)
    ring = huginn.generate(ids, num_steps=3, max_new_tokens=8, do_sample=False, init_scale=0.0, core_slots=3)
    assert torch.equal(full, ring)


def test_new_steps_see_earlier_tokens_latest_step():
    """A token fed at depth 2 then a token at depth 4: steps 3 and 4 of the second token read the first
    token's step-2 keys (its latest), which is what a cache filled at depth 2 everywhere would give."""
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig.preset("debug")).eval()
    cache = RecurrentCache()
    ids = prompt(1, 5)
    with torch.no_grad():
        model(ids[:, :4], num_steps=2, init_scale=0.0, cache=cache)
        model(ids[:, 4:], num_steps=4, init_scale=0.0, cache=cache)
    step2, step4 = cache._layer(("core", 0, 1)), cache._layer(("core", 0, 3))
    assert step4.keys.shape == step2.keys.shape
    torch.testing.assert_close(step4.keys[..., :4, :], step2.keys[..., :4, :])


# --- what transformers' generation loop passes -----------------------------------------------------------------


def test_forward_gets_exactly_what_it_declares_from_generation_input_preparation(huginn):
    """transformers releases add bookkeeping inputs of their own (cache_position up to 5.23, the cache renamed in
    5.24, ...): the model's input preparation hands forward the arguments it declares and no others."""
    cache, ids = RecurrentCache(), prompt()
    inputs = huginn.prepare_inputs_for_generation(
        ids, **{CACHE_NAME: cache}, attention_mask=torch.ones_like(ids), cache_position=torch.arange(6),
        some_future_bookkeeping=torch.zeros(1), use_cache=True, num_steps=3, init_scale=0.0, continuous_cot=True,
        depth_log=[])
    declared = set(inspect.signature(huginn.forward).parameters)
    assert set(inputs) <= declared
    assert inputs["num_steps"] == 3 and inputs["use_cache"] and torch.equal(inputs["input_ids"], ids)
    assert any(inputs.get(name) is cache for name in ("cache", "past_key_values"))
    assert huginn(**inputs).logits.shape == (1, 6, huginn.config.vocab_size)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_generate_takes_the_cache_under_either_name(huginn, name):
    ids, cache = prompt(), RecurrentCache()
    out = huginn.generate(ids, num_steps=3, max_new_tokens=5, do_sample=False, init_scale=0.0, **{name: cache})
    assert torch.equal(out, recompute_greedy(huginn, ids, 5, 3))
    assert cache.get_seq_length() == ids.shape[1] + 4  # the caller's cache is the one generate filled


def test_misspelt_or_unsupported_arguments_are_clear_errors(huginn):
    with pytest.raises(ValueError, match="num_step"):
        huginn.generate(prompt(), num_step=8, max_new_tokens=2)
    with pytest.raises(TypeError, match="num_step"):
        huginn(prompt(), num_step=8)
    with pytest.raises(ValueError, match="pass the cache once"):
        huginn(prompt(), cache=RecurrentCache(), past_key_values=RecurrentCache())
    with pytest.raises(ValueError, match="no attentions or per-layer hidden states"):
        huginn.generate(prompt(), num_steps=2, max_new_tokens=2, output_hidden_states=True,
                        return_dict_in_generate=True)
    with pytest.raises(ValueError, match="core_slots or a cache"):
        huginn.generate(prompt(), num_steps=2, max_new_tokens=2, core_slots=2, cache=RecurrentCache())


# --- sampling, seeds, streaming --------------------------------------------------------------------------------


def test_sampling_and_random_initial_states_follow_the_seed(huginn):
    ids = prompt()

    def sample(seed):
        torch.manual_seed(seed)
        return huginn.generate(ids, num_steps=4, max_new_tokens=8, do_sample=True, top_k=0,
                               generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_streamer_prints_generated_text(capsys):
    tokenizer = character_tokenizer("abcdefgh =")
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig.preset("debug", vocab_size=len(tokenizer))).eval()
    ids = tokenizer("ab=", return_tensors="pt").input_ids
    out = model.generate(ids, num_steps=2, max_new_tokens=5, do_sample=False, init_scale=0.0,
                         streamer=TextStreamer(tokenizer))
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(out[0]).strip()


# --- adaptive exit ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion, threshold", [("kl", 1e-2), ("entropy-diff", 1e-2), ("latent-diff", 0.1),
                                                  ("cosine", 1e-2), ("argmax-stability", 3)])
def test_adaptive_exit_reports_steps_within_bounds(huginn, criterion, threshold):
    out = huginn.generate(prompt(), num_steps=24, max_new_tokens=8, do_sample=False, init_scale=0.0,
                          exit_criterion=criterion, exit_threshold=threshold, min_steps=3,
                          return_dict_in_generate=True)
    steps = out.steps_per_token
    assert steps.shape == (1, 8)
    assert bool(((steps >= 3) & (steps <= 24)).all())
    assert bool((steps < 24).any()), "the tiny model converges well before 24 steps under these thresholds"


def test_adaptive_exit_thresholds_trade_depth(huginn):
    def mean_steps(threshold, min_steps=1):
        out = huginn.generate(prompt(), num_steps=32, max_new_tokens=8, do_sample=False, init_scale=0.0,
                              exit_criterion="kl", exit_threshold=threshold, min_steps=min_steps,
                              return_dict_in_generate=True)
        return out.steps_per_token.float().mean().item()

    assert mean_steps(1e-1) < mean_steps(1e-6) < 32
    assert mean_steps(1e-1, min_steps=32) == 32


def test_exited_token_leaves_its_latest_step_in_the_cache(huginn):
    cache = RecurrentCache()
    out = huginn.generate(prompt(), num_steps=16, max_new_tokens=6, do_sample=False, init_scale=0.0,
                          exit_criterion="latent-diff", exit_threshold=0.2, cache=cache,
                          return_dict_in_generate=True)
    # steps every fed position ran: the prompt's, then each decode call's (steps_per_token[0] is the prompt's last)
    steps = torch.cat([out.prompt_steps[0], out.steps_per_token[0, 1:]])
    assert len(steps) == cache.get_seq_length()
    assert bool((steps < 16).any())
    checked = 0
    for step in range(16):
        layer = cache._layer(("core", 0, step))
        if layer is None:  # no token reached this step
            continue
        for position in range(layer.keys.shape[-2]):
            used = int(steps[position])
            if used <= step:  # a step past its exit holds the entry of its last computed step
                latest = cache._layer(("core", 0, used - 1)).keys[..., position, :]
                torch.testing.assert_close(layer.keys[..., position, :], latest)
                checked += 1
    assert checked > 0


def test_batched_adaptive_exit_matches_rows_alone(huginn):
    ids = torch.cat([prompt(1, 6, seed=1), prompt(1, 6, seed=2)])
    settings = dict(num_steps=16, max_new_tokens=6, do_sample=False, init_scale=0.0, exit_criterion="kl",
                    exit_threshold=1e-3, return_dict_in_generate=True)
    both = huginn.generate(ids, **settings)
    for i in range(2):
        alone = huginn.generate(ids[i:i + 1], **settings)
        assert both.sequences[i].tolist() == alone.sequences[0].tolist()
        assert both.steps_per_token[i].tolist() == alone.steps_per_token[0].tolist()


# --- continuous CoT --------------------------------------------------------------------------------------------


def greedy_by_hand(model, ids, new_tokens, continuous_cot):
    """Greedy cached decoding written out: each new token starts from zeros, or (continuous chain of thought)
    from the previous position's final latent state."""
    cache, tokens, logits = RecurrentCache(), ids, []
    with torch.no_grad():
        out = model(ids, num_steps=4, init_scale=0.0, cache=cache)
        for _ in range(new_tokens):
            logits.append(out.logits[:, -1])
            tokens = torch.cat([tokens, out.logits[:, -1:].argmax(-1)], dim=1)
            warm = out.latent_state[:, -1:] if continuous_cot else None
            out = model(tokens[:, -1:], num_steps=4, init_scale=0.0, cache=cache, initial_state=warm)
    return tokens, torch.stack(logits, dim=1)


def test_continuous_cot_starts_each_token_from_the_previous_final_state(huginn):
    ids = prompt(1, 7)
    settings = dict(num_steps=4, max_new_tokens=6, do_sample=False, init_scale=0.0, return_dict_in_generate=True,
                    output_logits=True)
    plain = huginn.generate(ids, **settings)
    cot = huginn.generate(ids, continuous_cot=True, **settings)
    for out, continuous in ((plain, False), (cot, True)):
        tokens, logits = greedy_by_hand(huginn, ids, 6, continuous)
        assert torch.equal(out.sequences, tokens)
        torch.testing.assert_close(torch.stack(out.logits, dim=1), logits)
    assert not torch.allclose(torch.stack(cot.logits[1:]), torch.stack(plain.logits[1:]))  # the warm start matters


# --- self-speculative decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("draft_steps, draft_length", [(1, 3), (2, 4), (4, 2)])
def test_speculative_greedy_equals_plain_greedy_at_verify_depth(huginn, draft_steps, draft_length):
    ids = prompt()
    plain = huginn.generate(ids, num_steps=6, max_new_tokens=12, do_sample=False, init_scale=0.0)
    spec = huginn.generate(ids, num_steps=6, max_new_tokens=12, init_scale=0.0, draft_steps=draft_steps,
                           draft_length=draft_length)
    assert torch.equal(spec.sequences, plain)
    assert 0.0 <= spec.acceptance_rate <= 1.0
    assert spec.drafted_tokens > 0 and spec.forward_passes > 0


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 3, 5, 8])
def test_speculative_never_exceeds_max_new_tokens(huginn, max_new_tokens):
    ids = prompt()
    spec = huginn.generate(ids, num_steps=4, max_new_tokens=max_new_tokens, init_scale=0.0, draft_steps=4,
                           draft_length=3)
    assert spec.sequences.shape[1] - ids.shape[1] == max_new_tokens
    assert spec.steps_per_token.shape == (1, max_new_tokens)


def test_speculative_with_the_verify_depth_accepts_everything(huginn):
    spec = huginn.generate(prompt(), num_steps=3, max_new_tokens=10, init_scale=0.0, draft_steps=3, draft_length=3)
    assert spec.acceptance_rate == 1.0


def test_speculative_batch_matches_plain_greedy(huginn):
    ids = torch.cat([prompt(1, 6, seed=3), prompt(1, 6, seed=4)])
    plain = huginn.generate(ids, num_steps=5, max_new_tokens=9, do_sample=False, init_scale=0.0)
    spec = huginn.generate(ids, num_steps=5, max_new_tokens=9, init_scale=0.0, draft_steps=2, draft_length=3)
    assert torch.equal(spec.sequences, plain)


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(exit_criterion="kl", exit_threshold=0.0), "threshold must be > 0"),
    (dict(exit_criterion="kl", exit_threshold=-1.0), "threshold must be > 0"),
    (dict(exit_criterion="vibes"), "unknown exit criterion"),
    (dict(exit_criterion="kl", min_steps=9), r"min_steps \(9\) > max steps"),
    (dict(exit_threshold=0.1), "without exit_criterion"),
    (dict(draft_steps=5), r"draft_steps \(5\) > verify steps"),
    (dict(draft_steps=0), "draft_steps must be >= 1"),
    (dict(draft_steps=2, do_sample=True), "greedy only"),
    (dict(num_steps=0), "num_steps must be >= 1"),
    (dict(core_slots=0), "core_slots"),
    (dict(prompt_num_steps=0), "num_steps must be >= 1"),
    (dict(prompt_num_steps=2, draft_steps=1), "not to speculative decoding"),
    (dict(exit_criterion="gate"), "needs a model with a trained exit gate"),
])
def test_bad_generation_settings(huginn, settings, message):
    settings = {"num_steps": 4, "max_new_tokens": 3, **settings}
    with pytest.raises(ValueError, match=message):
        huginn.generate(prompt(), **settings)


def test_generate_without_a_length_uses_transformers_default(tiny_model):
    ids = prompt(1, 4).clamp(max=tiny_model.config.vocab_size - 1)
    plain = tiny_model.generate(ids, num_steps=2, do_sample=False, init_scale=0.0, exit_criterion="kl")
    spec = tiny_model.generate(ids, num_steps=2, do_sample=False, init_scale=0.0, draft_steps=1)
    assert plain.shape[1] > 4 and spec.sequences.shape[1] > 4


@pytest.mark.parametrize("criterion, threshold, core_slots", [("kl", 1e-3, None), ("latent-diff", 0.05, None),
                                                               ("cosine", 1e-3, 2)])
def test_positions_that_have_exited_are_not_computed(huginn, criterion, threshold, core_slots):
    """Batched adaptive generation runs each core step on the positions still running only: the positions the
    steps computed add up to the steps the positions report (fewer than the batch at full depth), and each row's
    sequences, depths and cache are those it gets alone."""
    ids = torch.cat([prompt(1, 6, seed=s) for s in range(4)])
    settings = dict(num_steps=16, max_new_tokens=5, min_new_tokens=5, do_sample=False, init_scale=0.0,
                    exit_criterion=criterion, exit_threshold=threshold, core_slots=core_slots,
                    return_dict_in_generate=True)
    computed, core_step = [], huginn.core_step

    def counting_core_step(state, *args, **kwargs):
        computed.append(state.shape[0] * state.shape[1])  # (batch, seq), or (1, running positions) packed
        return core_step(state, *args, **kwargs)

    huginn.core_step = counting_core_step
    try:
        both = huginn.generate(ids, **settings)
    finally:
        del huginn.core_step
    reported = int(both.prompt_steps.sum()) + int(both.steps_per_token[:, 1:].sum())
    assert sum(computed) == reported < 16 * (ids.numel() + 4 * 4)
    for i in range(4):
        alone = huginn.generate(ids[i:i + 1], **settings)
        assert both.sequences[i].tolist() == alone.sequences[0].tolist()
        assert both.steps_per_token[i].tolist() == alone.steps_per_token[0].tolist()
        if core_slots is not None:  # a ring slot a row alone never revisits holds an older step than in the batch
            continue
        cache_both, cache_alone = getattr(both, CACHE_NAME), getattr(alone, CACHE_NAME)
        for key, index in cache_alone.slot_of.items():  # the batch ran on after this row had ended: compare its part
            alone_keys = cache_alone.layers[index].keys[0]
            both_keys = cache_both.layers[cache_both.slot_of[key]].keys[i, :, : alone_keys.shape[1]]
            torch.testing.assert_close(both_keys, alone_keys)


@pytest.mark.parametrize("padded", [False, True])
def test_a_generated_tokens_forward_never_waits_on_the_device(huginn, padded, monkeypatch):
    """After the prompt, generate's forwards read no tensor value on the host (no bool / int / item / tolist of a
    tensor: each a device sync on a GPU): the input checks ran once, on the prompt; and the output is what checked
    forwards give."""
    import contextlib

    ids = prompt(batch=2, length=6)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0
    expected = huginn.generate(ids, attention_mask=mask, num_steps=4, init_scale=0.0, max_new_tokens=5,
                               do_sample=False)

    @contextlib.contextmanager
    def no_host_reads():
        def refuse(*args, **kwargs):
            raise AssertionError("a generated token's forward read a tensor value on the host")
        with monkeypatch.context() as patch:
            for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
                patch.setattr(torch.Tensor, name, refuse)
            yield

    import functools

    forward, decoding_calls = huginn.forward, []

    @functools.wraps(forward)  # generate reads forward's signature
    def watched(*args, **kwargs):
        if kwargs.get("check_inputs", True):
            return forward(*args, **kwargs)
        decoding_calls.append(1)
        with no_host_reads():
            return forward(*args, **kwargs)

    monkeypatch.setattr(huginn, "forward", watched)
    out = huginn.generate(ids, attention_mask=mask, num_steps=4, init_scale=0.0, max_new_tokens=5, do_sample=False)
    assert len(decoding_calls) == 4  # every token after the prompt's
    assert torch.equal(out, expected)
