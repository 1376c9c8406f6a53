"""Per-position adaptive depth: once a position has exited, later core steps run on the running positions only
(recurrent_lm.active), which read its latest keys and values; the compute counter charges each position its own
steps."""

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from recurrent_lm import RecurrentCache, RecurrentConfig, RecurrentLM
from recurrent_lm.active import ActiveSet
from recurrent_lm.flops import forward_flops, positions_flops
from recurrent_lm.model import attention_bias, rope_angles


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RecurrentLM(RecurrentConfig.preset("debug")).eval()


def ids(batch=3, length=9, seed=0):
    return torch.randint(5, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def step_inputs(model, cache, attention_mask, new_tokens):
    """What forward hands a core step of a call that feeds new_tokens tokens after the cache's."""
    past = cache.get_seq_length()
    cache.begin(new_tokens)
    positions = model._positions(None, attention_mask, attention_mask.shape[0], new_tokens, past, "cpu")
    rope = rope_angles(positions, model.config.head_dim, model.config.rope_theta)
    return rope, attention_bias(attention_mask, new_tokens, past, "cpu"), past


@torch.no_grad()
def test_a_packed_step_over_every_position_is_the_dense_step(model):
    """Packing every position (left padding, a cache holding earlier tokens) computes what the dense step does,
    and stores the same keys and values."""
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # row 1 is left-padded
    dense_cache = RecurrentCache()
    model(ids(2, 4), attention_mask=mask[:, :4], num_steps=2, cache=dense_cache, init_scale=0.0)
    packed_cache = copy.deepcopy(dense_cache)
    d = model.config.hidden_size
    x, injected = torch.randn(2, 3, d), torch.randn(2, 3, d)
    for cache in (dense_cache, packed_cache):
        rope, bias, past = step_inputs(model, cache, mask, 3)
        model.core_step(x, injected, 0, rope, bias, cache)  # step 0 for everyone
    dense = model.core_step(x, injected, 1, rope, bias, dense_cache)
    every = ActiveSet.of(torch.ones(2, 3, dtype=torch.bool), bias, past)
    packed = model.core_step(every.pack(x), every.pack(injected), 1, every.pack_rope(rope), None, packed_cache, every)
    torch.testing.assert_close(every.scatter(torch.zeros_like(dense), packed), dense)
    for key, index in dense_cache.slot_of.items():
        torch.testing.assert_close(packed_cache.layers[packed_cache.slot_of[key]].keys, dense_cache.layers[index].keys)


@torch.no_grad()
def test_a_position_that_is_not_running_keeps_its_latest_keys_and_is_not_computed(model):
    mask = torch.ones(2, 5, dtype=torch.long)
    cache = RecurrentCache()
    rope, bias, past = step_inputs(model, cache, mask, 5)
    x, injected = torch.randn(2, 5, model.config.hidden_size), torch.randn(2, 5, model.config.hidden_size)
    model.core_step(x, injected, 0, rope, bias, cache)
    running = torch.tensor([[True, False, True, False, False], [False, True, False, False, True]])
    active = ActiveSet.of(running, bias, past)
    assert len(active) == 4 and active.width == 2
    moved = torch.randn_like(x)  # a state that moved: the running positions' keys at step 1 must be new ones
    out = model.core_step(active.pack(moved), active.pack(injected), 1, active.pack_rope(rope), None, cache, active)
    assert out.shape == (1, 4, model.config.hidden_size)  # four positions computed, not ten
    step0, step1 = cache._layer(("core", 0, 0)).keys, cache._layer(("core", 0, 1)).keys
    resting = ~running
    torch.testing.assert_close(step1.transpose(1, 2)[resting], step0.transpose(1, 2)[resting])
    assert not torch.allclose(step1.transpose(1, 2)[running], step0.transpose(1, 2)[running])


@torch.no_grad()
@pytest.mark.parametrize("criterion", ["latent-diff", "kl"])
def test_where_no_position_exits_the_adaptive_forward_is_the_fixed_depth_forward(model, criterion):
    tokens = ids()
    fixed = model(tokens, num_steps=6, init_scale=0.0)
    adaptive = model(tokens, num_steps=6, init_scale=0.0, exit_criterion=criterion, exit_threshold=1e-30)
    assert bool((adaptive.steps_used == 6).all())
    torch.testing.assert_close(adaptive.logits, fixed.logits)


@torch.no_grad()
@pytest.mark.parametrize("criterion, threshold", [("latent-diff", 0.3), ("kl", 1e-2), ("cosine", 1e-2),
                                                  ("acceleration", 0.3)])
def test_each_position_is_charged_the_steps_it_ran(model, criterion, threshold):
    """torch's own count of an adaptive forward is the per-position counter's (exited positions cost nothing),
    well under the count at the deepest position's depth for everyone."""
    tokens = ids(1, 16, seed=3)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(tokens, num_steps=12, init_scale=0.0, exit_criterion=criterion, exit_threshold=threshold)
    steps = out.steps_used[0].tolist()
    assert len(set(steps)) > 1 and max(steps) > min(steps) + 1, "positions should exit at different depths"
    lens = [min(s, 11) for s in steps] if criterion == "kl" else None
    counted = positions_flops(RecurrentConfig.preset("debug"), steps, logit_tokens=16, lens_decodes=lens).flops
    measured = counter.get_total_flops()
    assert abs(counted - measured) / measured < 0.03
    deepest = forward_flops(model.config, max(steps), 16, lens_decodes=min(max(steps), 11) if lens else 0).flops
    assert measured < deepest


def test_positions_flops_with_equal_depths_is_forward_flops():
    config = RecurrentConfig.preset("debug")
    assert positions_flops(config, [5] * 7, context_length=3, logit_tokens=7).flops == \
        forward_flops(config, 5, 7, 3).flops
    assert positions_flops(config, [2, 8], lens_decodes=[2, 7]).flops == \
        positions_flops(config, [2], context_length=1, lens_decodes=[2], logit_tokens=0).flops \
        + positions_flops(config, [8], context_length=1, lens_decodes=[7]).flops
    with pytest.raises(ValueError, match="one depth, lens count and gate count per position"):
        positions_flops(config, [2, 3], lens_decodes=[1])


@torch.no_grad()
@pytest.mark.parametrize("criterion, threshold", [("latent-diff", 0.2), ("acceleration", 0.2), ("kl", 1e-2)])
def test_left_padding_stops_after_one_step_and_rows_answer_as_alone(model, criterion, threshold):
    short, long = ids(1, 4, seed=1), ids(1, 8, seed=2)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :4] = 0
    settings = dict(num_steps=10, init_scale=0.0, exit_criterion=criterion, exit_threshold=threshold)
    both = model(batch, attention_mask=mask, **settings)
    assert both.steps_used[0, :4].tolist() == [1, 1, 1, 1]
    for row, alone_ids in ((0, short), (1, long)):
        alone = model(alone_ids, **settings)
        real = mask[row].bool()
        assert both.steps_used[row, real].tolist() == alone.steps_used[0].tolist()
        torch.testing.assert_close(both.logits[row, real], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_given_position_depths_are_run_and_cost_only_their_steps(model):
    """position_depths (a router's choice, or a training draw): each position runs exactly its steps, the core
    computes only those, all equal to num_steps is the fixed-depth forward, and gradients flow through the packed
    steps (training with per-position depth)."""
    tokens = ids(2, 6)
    depths = torch.tensor([[1, 3, 2, 4, 4, 1], [2, 2, 4, 1, 3, 4]])
    computed, core_step = [], model.core_step

    def counting_core_step(state, *args, **kwargs):
        computed.append(state.shape[0] * state.shape[1])
        return core_step(state, *args, **kwargs)

    model.core_step = counting_core_step
    try:
        with torch.no_grad():
            out = model(tokens, num_steps=4, init_scale=0.0, position_depths=depths)
    finally:
        del model.core_step
    assert out.steps_used.tolist() == depths.tolist() and sum(computed) == int(depths.sum())
    with torch.no_grad():
        full = model(tokens, num_steps=4, init_scale=0.0, position_depths=torch.full_like(depths, 4))
        torch.testing.assert_close(full.logits, model(tokens, num_steps=4, init_scale=0.0).logits)
    trained = copy.deepcopy(model).train()
    loss = trained(tokens, labels=tokens, num_steps=4, init_scale=0.0, position_depths=depths).loss
    loss.backward()
    assert trained.adapter.weight.grad is not None and bool(trained.adapter.weight.grad.abs().sum() > 0)
    for bad, message in ((depths[:, :3], "shaped like input_ids"), (depths + 4, r"each be in 1\.\.4"),
                         (depths.float(), "integer steps")):
        with pytest.raises(ValueError, match=message):
            model(tokens, num_steps=4, position_depths=bad)
