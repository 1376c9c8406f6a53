"""The one compute counter against torch's own FLOP counter."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from recurrent_lm import RecurrentCache, RecurrentConfig, RecurrentLM, forward_flops
from recurrent_lm.flops import causal_lm_generation_flops, generation_flops


def measured_flops(model, **kwargs) -> int:
    # The math SDPA backend runs attention as matmuls that FlopCounterMode sees (the fused CPU kernel it does not).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("steps", [1, 3, (2, 2)])
@pytest.mark.parametrize("tied", [True, False])
def test_forward_flops_match_torch_flop_counter(steps, tied):
    config = RecurrentConfig.preset("debug", tie_word_embeddings=tied)
    model = RecurrentLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (3, 24))
    measured = measured_flops(model, input_ids=ids, num_steps=steps)
    counted = forward_flops(config, steps, new_tokens=24, batch_size=3).flops
    assert abs(counted - measured) / measured < 0.05


def test_flops_with_cache_context_and_last_logits_only():
    config = RecurrentConfig.preset("debug")
    model = RecurrentLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        cache = RecurrentCache()
        model(ids[:, :15], num_steps=3, cache=cache)
    measured = measured_flops(model, input_ids=ids[:, 15:], num_steps=3, cache=cache, logits_to_keep=1)
    counted = forward_flops(config, 3, new_tokens=5, context_length=15, batch_size=2, logit_tokens=1).flops
    assert abs(counted - measured) / measured < 0.05


def test_flops_grow_linearly_with_depth_and_params_count_repeats():
    config = RecurrentConfig.preset("debug")
    f1, f2, f3 = (forward_flops(config, r, new_tokens=16) for r in (1, 2, 3))
    assert f3.flops - f2.flops == f2.flops - f1.flops > 0
    d, inter = config.hidden_size, config.intermediate_size
    per_step = config.num_core_layers * (4 * d * d + 3 * d * inter) + d * d
    assert f2.params - f1.params == per_step


def test_generation_flops_is_prefill_plus_one_token_per_step():
    config = RecurrentConfig.preset("debug")
    total = generation_flops(config, prompt_length=10, steps_per_token=[4, 2, 8])
    expected = (forward_flops(config, 4, 10, logit_tokens=1).flops + forward_flops(config, 2, 1, 10).flops
                + forward_flops(config, 8, 1, 11).flops)
    assert total.flops == expected
    assert causal_lm_generation_flops(RecurrentLM(config), 10, 3, num_steps=4) == generation_flops(config, 10, [4, 4, 4]).flops
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        forward_flops(config, 0)


def test_logit_lens_passes_of_adaptive_exit_are_counted():
    config = RecurrentConfig.preset("debug")
    model = RecurrentLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 12))
    # a huge threshold: every position exits at step 2, after two logit-lens passes (steps 1 and 2)
    measured = measured_flops(model, input_ids=ids, num_steps=6, init_scale=0.0, exit_criterion="kl",
                              exit_threshold=1e9)
    counted = forward_flops(config, 2, new_tokens=12, lens_decodes=2).flops
    assert abs(counted - measured) / measured < 0.05


def test_generation_flops_of_any_causal_lm_match_torch():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)).eval()
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        llama.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    # exact but for the rotary frequencies, which transformers releases before 5.11 compute as a small matmul
    # (head_dim / 2 x positions, 120 FLOPs here) that the counter, like the usual MFU formula, leaves out
    measured = counter.get_total_flops()
    assert 0 <= measured - causal_lm_generation_flops(llama, 10, 6) <= 2 * (8 // 2) * (10 + 5)
    recurrent = RecurrentLM(RecurrentConfig.preset("debug")).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        recurrent.generate(torch.randint(0, 256, (1, 10)), num_steps=3, max_new_tokens=6, min_new_tokens=6,
                           do_sample=False, pad_token_id=0, init_scale=0.0)
    counted = causal_lm_generation_flops(recurrent, 10, 6, num_steps=3)
    assert abs(counted - counter.get_total_flops()) / counted < 0.05


@pytest.mark.parametrize("criterion, threshold, prompt_num_steps", [("latent-diff", 0.2, None), ("kl", 1e-2, None),
                                                                   ("gate", 0.5, None), ("gate", 0.5, 5),
                                                                   ("kl", 1e-2, 3)])
def test_batched_adaptive_generation_costs_what_the_counter_says(criterion, threshold, prompt_num_steps):
    """torch's count of a batched adaptive generate equals the sum over rows of the counter's value for the depths
    each row's tokens used (rows that have exited are not computed), logit-lens passes and exit-gate checks
    included; with prompt_num_steps the prompt runs that depth with no checks."""
    from recurrent_lm.answering import Answer, answer_flops

    torch.manual_seed(0)
    config = RecurrentConfig.preset("debug", exit_gate_width=16 if criterion == "gate" else 0)
    model = RecurrentLM(config).eval()
    ids = torch.randint(5, config.vocab_size, (3, 8))
    settings = dict(num_steps=12, max_new_tokens=4, min_new_tokens=4, do_sample=False, init_scale=0.0,
                    exit_criterion=criterion, exit_threshold=threshold, return_dict_in_generate=True, eos_token_id=None,
                    pad_token_id=0, prompt_num_steps=prompt_num_steps)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model.generate(ids, **settings)
    steps = out.steps_per_token
    assert len(set(steps.flatten().tolist())) > 1, "rows and tokens should exit at different depths"
    counted = sum(answer_flops(config, Answer(None, "", None, 0.0, 4, 8, steps[i].tolist(),
                                              out.prompt_steps[i].tolist()), 12, criterion,
                                  prompt_exit=prompt_num_steps is None) for i in range(3))
    if prompt_num_steps is not None:
        assert (out.prompt_steps == prompt_num_steps).all() and (steps[:, 0] == prompt_num_steps).all()
    measured = counter.get_total_flops()
    assert abs(counted - measured) / measured < 0.05
