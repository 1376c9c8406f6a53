"""The looped-model literature's benchmarks: prefix sums (answered at every position), addition with Abacus
positions, copy; the progressive loss; the model options they need."""

from types import SimpleNamespace

import pytest
import torch

from recurrent_lm import RecurrentConfig, RecurrentLM
from recurrent_lm.answering import answer_flops, answer_problems
from recurrent_lm.cache import CACHE_NAME
from recurrent_lm.data import IGNORE, encode_problem
from recurrent_lm.flops import forward_flops
from recurrent_lm.tasks import get_task, task_tokenizer
from recurrent_lm.train.module import RecurrentLMModule, progressive_num_steps


def test_prefix_sums_answer_is_the_running_parity_at_every_position():
    task = get_task("prefix-sums")
    for problem in task.problems(40, 20, seed=3):
        bits = problem.question.rstrip("?")
        assert len(bits) == 40 and problem.question.endswith("?")
        assert problem.answer == "".join(str(bits[: i + 1].count("1") % 2) for i in range(40))
        assert [t for _, t in problem.hints] == list(problem.answer)
        assert task.completion(problem) == "<eos>"  # nothing is written after the prompt
    with pytest.raises(ValueError, match="no chain of thought"):
        task.render(problem, cot=True)


def test_prefix_sums_labels_every_bit_even_without_the_hints_option():
    tokenizer, task = task_tokenizer(["prefix-sums"]), get_task("prefix-sums")
    problem = task.problems(6, 1, seed=0)[0]
    encoded = encode_problem(tokenizer, task, problem, hints=False)
    labels = encoded["labels"]
    # position t predicts label t + 1: the bit at token t (bos is token 0) predicts its running parity
    predicted = [tokenizer.decode([labels[t + 1]]) for t in range(1, 7)]
    assert "".join(predicted) == problem.answer
    assert labels[0] == IGNORE and labels[-1] == tokenizer.eos_token_id


def test_addition_is_right_reversed_and_its_operands_have_the_difficultys_length():
    task = get_task("addition")
    for n in (1, 3, 12):
        for problem in task.problems(n, 30, seed=5):
            a, b = problem.question.rstrip("=").split("+")
            assert max(len(a), len(b)) == n and min(len(a), len(b)) >= 1
            assert all(len(x) == 1 or x[-1] != "0" for x in (a, b))  # no leading zero (reversed: the last digit)
            assert int(problem.answer[::-1]) == int(a[::-1]) + int(b[::-1])
            chain = task.completion(problem, cot=True).split("</think>")[0]
            assert "".join(step[0] for step in chain.split(";")[:-1]) == problem.answer
    assert task.distinct_problems(1) == 100 and task.distinct_problems(2) == 90 * 200 - 90 * 90


def test_addition_slots_hold_the_sum_digit_by_digit_and_are_labelled_where_they_stand():
    task, tokenizer = get_task("addition-slots"), task_tokenizer(["addition-slots"])
    for n in (1, 3, 12):
        for problem in task.problems(n, 30, seed=5):
            question, slots = problem.question.rstrip("?").split("=")
            a, b = question.split("+")
            assert max(len(a), len(b)) == n and slots == "_" * (n + 1) and len(problem.answer) == n + 1
            assert int(problem.answer[::-1]) == int(a[::-1]) + int(b[::-1])  # a final 0 where there is no carry
            encoded = encode_problem(tokenizer, task, problem)
            slot_id = tokenizer.convert_tokens_to_ids("_")
            first = encoded["input_ids"].index(slot_id)
            # slot i's position predicts digit i: the label one place after it (transformers' shift); then eos
            labelled = [i for i, label in enumerate(encoded["labels"]) if label != IGNORE]
            assert labelled == list(range(first + 1, first + n + 3))
            assert tokenizer.decode(encoded["labels"][first + 1 : first + n + 2]) == problem.answer
    with pytest.raises(ValueError, match="no chain of thought"):
        task.completion(task.problems(2, 1)[0], cot=True)


def test_addition_columns_align_each_digit_with_its_slot():
    task, tokenizer = get_task("addition-columns"), task_tokenizer(["addition-columns"])
    for n in (1, 4, 15):
        for problem in task.problems(n, 30, seed=2):
            columns = [problem.question[i : i + 3] for i in range(0, len(problem.question) - 1, 3)]
            assert len(columns) == n + 1 and all(c[2] == "_" for c in columns) and problem.question[-1] == "?"
            a, b = (int("".join(c[k] for c in columns)[::-1]) for k in (0, 1))
            assert max(len(str(a)), len(str(b))) == n and columns[-1][:2] == "00"
            assert problem.answer == str(a + b)[::-1].ljust(n + 1, "0")
            labels = encode_problem(tokenizer, task, problem)["labels"]
            digits = [label for label in labels if label != IGNORE][:-1]  # then eos
            assert tokenizer.decode(digits) == problem.answer
            # the label after slot i (bos first: slot i is token 3i + 3) is digit i
            assert [labels[3 * i + 4] for i in range(n + 1)] == digits


def test_addition_slots_are_counted_as_places_and_read_in_one_forward():
    tokenizer, task = task_tokenizer(["addition-slots"]), get_task("addition-slots")
    counted = tokenizer.convert_tokens_to_ids(list("0123456789_"))
    config = RecurrentConfig.preset("debug", vocab_size=len(tokenizer), use_rope=False, abacus_positions=32,
                                    abacus_token_ids=counted)
    model = RecurrentLM(config).eval()
    ids = torch.tensor([tokenizer("12+345=____?").input_ids])
    assert model.abacus_ids(ids).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 0]]  # slot i shares place i + 1

    class SumOracle(torch.nn.Module):  # logits naming, at each slot, the digit it should hold
        device = torch.device("cpu")

        def forward(self, input_ids, attention_mask=None, **kwargs):
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            for row, ids in enumerate(input_ids.tolist()):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                a, b = text.split("=")[0].split("+")
                total = str(int(a[::-1]) + int(b[::-1]))[::-1].ljust(text.count("_"), "0")
                first = ids.index(tokenizer.convert_tokens_to_ids("_"))
                for i, digit in enumerate(total):
                    logits[row, first + i, tokenizer.convert_tokens_to_ids(digit)] = 1.0
            return SimpleNamespace(logits=logits)

    problems = task.problems(3, 3, seed=1) + task.problems(9, 3, seed=1)  # left padding in a batch
    answers = answer_problems(SumOracle(), tokenizer, problems, batch_size=6)
    assert [a.answer for a in answers] == [p.answer for p in problems] and all(a.score == 1.0 for a in answers)


def test_copy_answer_is_the_input():
    for problem in get_task("copy").problems(9, 5, seed=1):
        assert problem.question == problem.answer + "?" and len(problem.answer) == 9


class ParityOracle(torch.nn.Module):
    """A stand-in model whose logits at every position name the running parity of the bits read so far (and,
    `wrong` set, the opposite at that bit), to check where read_answers reads."""

    def __init__(self, tokenizer, wrong: int | None = None):
        super().__init__()
        self.ids = {c: tokenizer.convert_tokens_to_ids(c) for c in "01"}
        self.vocab, self.wrong, self.calls = len(tokenizer), wrong, []
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, num_steps=None, init_scale=None):
        self.calls.append(num_steps)
        parity = torch.cumsum((input_ids == self.ids["1"]).long(), -1) % 2
        if self.wrong is not None:
            bits = torch.cumsum(((input_ids == self.ids["0"]) | (input_ids == self.ids["1"])).long(), -1)
            parity = torch.where(bits == self.wrong + 1, 1 - parity, parity)
        target = torch.where(parity == 1, self.ids["1"], self.ids["0"])
        return SimpleNamespace(logits=torch.nn.functional.one_hot(target, self.vocab).float())


def test_prefix_sums_are_read_at_every_bit_of_left_padded_batches():
    tokenizer, task = task_tokenizer(["prefix-sums"]), get_task("prefix-sums")
    problems = task.problems(5, 3, seed=0) + task.problems(17, 3, seed=0)  # two lengths: left padding in a batch
    oracle = ParityOracle(tokenizer)
    answers = answer_problems(oracle, tokenizer, problems, batch_size=4, num_steps=7, init_scale=0.0,
                              exit_criterion=None)
    assert [a.answer for a in answers] == [p.answer for p in problems] and all(a.score == 1.0 for a in answers)
    assert oracle.calls == [7, 7] and all(a.new_tokens == 0 for a in answers)
    wrong = answer_problems(ParityOracle(tokenizer, wrong=4), tokenizer, problems, batch_size=4, num_steps=7)
    assert all(a.score == 0.0 and len(a.answer) == a.problem.difficulty for a in wrong)


def test_a_read_answer_costs_one_forward_over_the_prompt_with_logits_everywhere():
    tokenizer, task = task_tokenizer(["prefix-sums"]), get_task("prefix-sums")
    config = RecurrentConfig.preset("debug", vocab_size=len(tokenizer))
    model = RecurrentLM(config).eval()
    problems = task.problems(12, 2, seed=0)
    answers = answer_problems(model, tokenizer, problems, num_steps=3, init_scale=0.0)
    length = answers[0].prompt_tokens
    assert length == 14  # bos, 12 bits, ?
    expected = forward_flops(config, 3, length, logit_tokens=length).flops
    assert answer_flops(config, answers[0], 3) == expected
    with pytest.raises(ValueError, match="no chain of thought"):
        answer_problems(model, tokenizer, problems, cot=True, num_steps=3)


def abacus_model(**overrides) -> tuple[RecurrentLM, object]:
    tokenizer = task_tokenizer(["addition"])
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    config = RecurrentConfig.preset("debug", **{"vocab_size": len(tokenizer), "use_rope": False,
                                                "abacus_positions": 32, "abacus_token_ids": digits, **overrides})
    torch.manual_seed(0)
    return RecurrentLM(config).eval(), tokenizer


def test_abacus_positions_count_within_each_number():
    model, tokenizer = abacus_model()
    ids = torch.tensor([tokenizer("12+345=67").input_ids])  # bos first
    assert model.abacus_ids(ids).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]]


def generated_as_full_forwards(model, prompt: torch.Tensor, steps: int, new_tokens: int, pad_token_id: int):
    """Greedy generation with a cache, checked token by token against the argmax of a forward over the whole
    sequence without one; returns the generated sequence."""
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, num_steps=steps, init_scale=0.0,
                         pad_token_id=pad_token_id, eos_token_id=None)
    sequence = out[0] if isinstance(out, torch.Tensor) else out.sequences[0]
    for t in range(prompt.shape[1], sequence.shape[0]):
        assert int(model(sequence[None, :t], num_steps=steps, init_scale=0.0).logits[0, -1].argmax()) == int(sequence[t])
    return sequence


def test_abacus_generation_with_a_cache_equals_full_forwards():
    """generate feeds each new token's Abacus position, counted over the whole sequence: its greedy tokens are the
    argmax of forwards over the full sequence without a cache."""
    model, tokenizer = abacus_model()
    prompt = torch.tensor([tokenizer("4021+93=").input_ids])
    sequence = generated_as_full_forwards(model, prompt, 3, 6, tokenizer.pad_token_id)
    cache_out = model(prompt, num_steps=3, init_scale=0.0, use_cache=True)
    with pytest.raises(ValueError, match="needs the new tokens' abacus_ids"):
        model(sequence[None, prompt.shape[1]:prompt.shape[1] + 1], num_steps=3,
                  **{CACHE_NAME: getattr(cache_out, CACHE_NAME)})
    with pytest.raises(ValueError, match="table has 32 rows"):
        model(prompt, abacus_ids=torch.full_like(prompt, 40), num_steps=1)


def test_a_model_without_abacus_positions_keeps_its_weights_and_refuses_abacus_ids(tiny_model):
    assert not any(name.startswith("abacus") for name, _ in tiny_model.named_parameters())
    with pytest.raises(ValueError, match="without Abacus positions"):
        tiny_model(torch.tensor([[1, 2, 3]]), abacus_ids=torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="abacus_token_ids"):
        RecurrentConfig.preset("debug", abacus_positions=8)


def test_abacus_offset_trains_rows_past_the_trained_lengths():
    """With model.abacus_offset, every batch's positions are shifted by one draw: rows beyond the longest trained
    number (3 digits + the answer's carry: rows 1..4) get gradients; without it they never do."""
    from recurrent_lm.data import collate

    _, tokenizer = abacus_model()
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    problems = get_task("addition").problems(3, 8, seed=0)
    task = get_task("addition")
    batch = collate([encode_problem(tokenizer, task, p) for p in problems], tokenizer.pad_token_id)

    def trained_rows(offset: int) -> set[int]:
        architecture = dict(preset="debug", vocab_size=len(tokenizer), use_rope=False, abacus_positions=32,
                            abacus_token_ids=digits)
        module = RecurrentLMModule(architecture, abacus_offset=offset)
        module.log_dict = module.log = lambda *args, **kwargs: None
        module._trainer = SimpleNamespace(world_size=1, optimizers=[SimpleNamespace(param_groups=[{"lr": 0}])],
                                          max_steps=10, global_step=0)
        rows = set()
        for step in range(6):
            module.model.zero_grad()
            module._trainer.global_step = step
            module.training_step(batch, step).backward()
            rows |= set(module.model.abacus.weight.grad.abs().sum(-1).nonzero().flatten().tolist())
        return rows

    assert max(trained_rows(0)) <= 4
    assert max(trained_rows(20)) > 4


def test_progressive_unroll_draws_stay_inside_the_step_depth():
    draws = [progressive_num_steps(10, 3, torch.Generator().manual_seed(s)) for s in range(400)]
    totals = [d.total for d in draws]
    assert min(totals) == 1 and max(totals) == 10 and all(1 <= d.grad <= 3 for d in draws)
    assert {d.no_grad for d in draws} >= set(range(0, 8))
    assert progressive_num_steps(1, 4, torch.Generator()) == (0, 1)


def test_attention_window_limits_how_far_back_a_position_sees_per_layer():
    """Window 2: each layer reaches one token further back, so with 1 + 2r + 1 layers position 5 reads token 0
    (5 back) at r = 2 but not at r = 1; generation with a cache masks the same keys as a full forward."""
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig.preset("debug", attention_window=2)).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    changed = ids.clone()
    changed[0, 0] = 11
    for steps, reaches in ((1, False), (2, True)):
        a, b = (model(x, num_steps=steps, init_scale=0.0).logits[0, 5] for x in (ids, changed))
        assert (not torch.allclose(a, b)) == reaches, steps
    generated_as_full_forwards(model, ids, 2, 5, pad_token_id=0)
    with pytest.raises(ValueError, match="attention_window must be >= 1"):
        RecurrentConfig.preset("debug", attention_window=0)


def test_adaptive_exit_under_an_attention_window_sees_the_same_keys_as_fixed_depth():
    """Packed running positions (recurrent_lm.active) take the window's mask too: a threshold no position meets
    runs every position to the maximum and gives the fixed-depth logits."""
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig.preset("debug", attention_window=2)).eval()
    ids = torch.randint(3, 200, (3, 9))
    fixed = model(ids, num_steps=4, init_scale=0.0).logits
    adaptive = model(ids, num_steps=4, init_scale=0.0, exit_criterion="kl", exit_threshold=1e-30)
    assert bool((adaptive.steps_used == 4).all()) and torch.allclose(adaptive.logits, fixed, atol=1e-5)
    depths = torch.randint(1, 5, ids.shape, generator=torch.Generator().manual_seed(0))
    mixed = model(ids, num_steps=4, init_scale=0.0, position_depths=depths)  # some positions stop, some run on
    assert torch.equal(mixed.steps_used, depths)
    for row in range(3):  # the first position sees itself only: its logits are fixed depth's at its own depth
        alone = model(ids[row : row + 1, :1], num_steps=int(depths[row, 0]), init_scale=0.0).logits[0, 0]
        assert torch.allclose(mixed.logits[row, 0], alone, atol=1e-5)


def test_attention_log_scale_sharpens_each_query_by_the_log_of_the_keys_it_sees():
    """attention_log_scale: softmax(log(n) q.k / sqrt(d)) with n the keys a query may attend to (padding not
    counted); computed by hand here, once without a mask (plain causal) and once left-padded."""
    from recurrent_lm.model import Attention, attention_bias

    config = RecurrentConfig.preset("debug", use_rope=False, qk_bias=False, attention_log_scale=True)
    torch.manual_seed(0)
    attention = Attention(config).eval()
    x = torch.randn(2, 5, config.hidden_size)
    padding = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    for mask in (None, attention_bias(padding, 5, 0, x.device)):
        q, k, v = (t.unflatten(-1, (config.num_attention_heads, -1)).transpose(1, 2)
                   for t in attention.qkv(x).split(attention.split, dim=-1))
        allowed = torch.ones(5, 5).tril().bool()[None, None] if mask is None else mask
        n = allowed.sum(-1, keepdim=True).float()
        scores = (q @ k.transpose(-1, -2)) * n.log() / config.head_dim**0.5
        expected = attention.proj((scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2).flatten(2))
        assert torch.allclose(attention(x, None, mask), expected, atol=1e-5)


def test_attention_log_scale_keeps_cached_padded_and_packed_forwards_equal():
    """With attention_log_scale the count of keys follows the cache, the padding and the packed running positions
    of adaptive exit: generation equals full forwards, a left-padded row equals the row alone, and an exit
    threshold no position meets gives the fixed-depth logits."""
    model, tokenizer = abacus_model(attention_log_scale=True)
    plain, _ = abacus_model()
    prompt = torch.tensor([tokenizer("4021+93=").input_ids])
    assert not torch.allclose(model(prompt, num_steps=3, init_scale=0.0).logits,
                              plain(prompt, num_steps=3, init_scale=0.0).logits)  # the same weights, other scores
    sequence = generated_as_full_forwards(model, prompt, 3, 6, tokenizer.pad_token_id)
    short = torch.tensor([tokenizer("21+93=").input_ids])
    padded = torch.cat([torch.full((1, 2), tokenizer.pad_token_id), short], 1)
    both = model(torch.cat([padded, prompt]), attention_mask=torch.tensor([[0, 0] + [1] * 7, [1] * 9]),
                 num_steps=3, init_scale=0.0).logits
    assert torch.allclose(both[0, 2:], model(short, num_steps=3, init_scale=0.0).logits[0], atol=1e-5)
    fixed = model(sequence[None], num_steps=4, init_scale=0.0).logits
    adaptive = model(sequence[None], num_steps=4, init_scale=0.0, exit_criterion="kl", exit_threshold=1e-30)
    assert torch.allclose(adaptive.logits, fixed, atol=1e-5)


def test_abacus_rope_rotates_by_the_place_of_each_digit_in_its_number():
    """abacus_rope: queries and keys turn by the Abacus position, so scores depend on differences of digit places
    only. Without the learned table, shifting every position by the same amount leaves the logits unchanged;
    sequence positions would give other logits; cached generation equals full forwards."""
    model, tokenizer = abacus_model(use_rope=True, abacus_rope=True, abacus_positions=0)
    sequential, _ = abacus_model(use_rope=True)
    sequential.load_state_dict(model.state_dict(), strict=False)
    ids = torch.tensor([tokenizer("4021+93=3421").input_ids])
    places = model.abacus_ids(ids)
    logits = model(ids, num_steps=3, init_scale=0.0).logits
    shifted = model(ids, abacus_ids=places + 7, num_steps=3, init_scale=0.0).logits
    assert torch.allclose(logits, shifted, atol=1e-5)
    assert not torch.allclose(logits, model(ids, abacus_ids=places * 2, num_steps=3, init_scale=0.0).logits)
    assert not torch.allclose(logits[:, 1:], sequential(ids, num_steps=3, init_scale=0.0).logits[:, 1:])
    prompt = ids[:, :9]
    generated_as_full_forwards(model, prompt, 3, 5, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="needs use_rope"):
        RecurrentConfig.preset("debug", use_rope=False, abacus_rope=True, abacus_token_ids=[1, 2])
    with pytest.raises(ValueError, match="abacus_token_ids"):
        RecurrentConfig.preset("debug", abacus_rope=True)
    with pytest.raises(ValueError, match="must be >= 0"):
        model(ids, abacus_ids=places - 1, num_steps=1)


def test_random_abacus_places_keep_each_place_shared_and_ordered_and_reach_every_row():
    """model.abacus_places random: a batch's places map to a sorted random sample of rows 1..longest + offset, the
    same for every number (the units digits of both operands and the answer share a row), increasing with the
    place; over a few batches every row of the range occurs, and rows far apart occur in one number."""
    from recurrent_lm.data import collate

    _, tokenizer = abacus_model()
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    task = get_task("addition")
    batch = collate([encode_problem(tokenizer, task, p) for p in task.problems(3, 8, seed=0)], tokenizer.pad_token_id)
    architecture = dict(preset="debug", vocab_size=len(tokenizer), use_rope=False, abacus_positions=32,
                        abacus_token_ids=digits)
    module = RecurrentLMModule(architecture, abacus_offset=12, abacus_places="random")
    module._trainer = SimpleNamespace(global_step=0)
    places = module.model.abacus_ids(batch["input_ids"])
    seen, spans = set(), []
    for step in range(30):
        module._trainer.global_step = step
        rows = module.training_abacus_ids(batch["input_ids"])
        mapping = {}
        for place, row in zip(places.flatten().tolist(), rows.flatten().tolist()):
            assert (row == 0) == (place == 0)
            assert mapping.setdefault(place, row) == row  # one row per place, in every number
        ordered = [mapping[p] for p in sorted(mapping) if p > 0]
        assert ordered == sorted(set(ordered))
        seen |= set(ordered)
        spans.append(ordered[-1] - ordered[0])
    longest = int(places.max())
    assert seen == set(range(1, longest + 12 + 1)) and max(spans) > longest
    with pytest.raises(ValueError, match="abacus_offset > 0"):
        RecurrentLMModule(architecture, abacus_places="random")
