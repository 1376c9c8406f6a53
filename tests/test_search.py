"""Process rewards and search: step labels, reward-model conventions, weighted best-of-N, beam search, DVTS, REBASE
and their FLOPs."""

import math
import random

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          LlamaForTokenClassification)

from recurrent_lm import RecurrentConfig, RecurrentLM
from recurrent_lm.data import encode_step_labels, labelled_chain
from recurrent_lm.eval.budget_forcing import weighted_vote
from recurrent_lm.eval.reward_models import (RewardModel, SequenceClassificationRewardModel, StepTagRewardModel,
                                             TokenClassificationRewardModel, aggregate, load_reward_model)
from recurrent_lm.eval.search import DVTS, REBASE, BeamSearch, Node, StepPolicy, softmax_allocation
from recurrent_lm.flops import causal_lm_extend_flops, causal_lm_forward_flops
from recurrent_lm.problem import split_steps
from recurrent_lm.special_tokens import BAD_STEP, GOOD_STEP, STEP_TAG, THINK_END
from recurrent_lm.tasks import PointerTask, get_task, task_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return task_tokenizer(["pointer", "chain"], STEP_TAG + GOOD_STEP + BAD_STEP)


# --- steps and their labels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chain", "permutation", "parity", "pointer"])
def test_worked_steps_are_good_and_a_corrupted_step_is_bad_from_there_on(name):
    task = get_task(name)
    problem = task.problems(4, 1, seed=3)[0]
    steps = task.solution_steps(problem)
    assert "".join(steps) == task.completion(problem, cot=True) and steps[-1].startswith(THINK_END)
    assert task.step_labels(problem, steps) == [True] * len(steps)
    wrong = list(steps)
    wrong[1] = task.corrupt_step(steps[1], random.Random(0))
    assert wrong[1] != steps[1]
    assert task.step_labels(problem, wrong)[:-1] == [True] + [False] * (len(steps) - 2)
    wrong_answer = steps[:-1] + [task.corrupt_step(steps[-1], random.Random(1))]
    assert task.step_labels(problem, wrong_answer) == [True] * (len(steps) - 1) + [False]


def test_split_steps_gives_the_completion_back_and_keeps_an_unfinished_step():
    assert split_steps("a=1;b=1+2=3;</think>3<eos>", ";") == ["a=1;", "b=1+2=3;", "</think>3<eos>"]
    assert split_steps("a=1;b=1+", ";") == ["a=1;", "b=1+"]
    assert split_steps("", ";") == []
    with pytest.raises(ValueError, match="no step separator"):
        type("NoSteps", (PointerTask,), {"step_separator": None})().require_steps()


def test_step_labels_supervise_the_tag_positions_only(tokenizer):
    task = get_task("pointer")
    problem = task.problems(3, 1, seed=1)[0]
    steps, labels = labelled_chain(task, problem, 1.0, random.Random(4))
    encoded = encode_step_labels(tokenizer, task.prompt(problem, cot=True), steps, labels)
    tag, good, bad = (tokenizer.convert_tokens_to_ids(t) for t in (STEP_TAG, GOOD_STEP, BAD_STEP))
    supervised = [i for i, label in enumerate(encoded["labels"]) if label != -100]
    assert [i - 1 for i in supervised] == encoded["tag_positions"]
    assert all(encoded["input_ids"][p] == tag for p in encoded["tag_positions"])
    assert [encoded["labels"][i] for i in supervised] == [good if label else bad for label in labels]
    assert not all(labels)  # a corrupted chain


# --- reward models --------------------------------------------------------------------------------------------------


def llama_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                       num_hidden_layers=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, num_labels=2)


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory, tokenizer):
    """A tiny random model of each Hugging Face convention, and one of this project's, saved locally."""
    root = tmp_path_factory.mktemp("reward-models")
    torch.manual_seed(0)
    models = {"ours": RecurrentLM(RecurrentConfig.preset("debug", vocab_size=len(tokenizer), mean_recurrence=1)),
              "causal": LlamaForCausalLM(llama_config(len(tokenizer))),
              "token": LlamaForTokenClassification(llama_config(len(tokenizer))),
              "sequence": LlamaForSequenceClassification(llama_config(len(tokenizer)))}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def chain_example():
    task = get_task("pointer")
    problem = task.problems(3, 1, seed=2)[0]
    return task.prompt(problem, cot=True), task.solution_steps(problem)


@pytest.mark.parametrize("name, kind", [("ours", StepTagRewardModel), ("causal", StepTagRewardModel),
                                        ("token", TokenClassificationRewardModel),
                                        ("sequence", SequenceClassificationRewardModel)])
def test_every_convention_loads_and_scores_each_step(reward_dirs, name, kind):
    scorer = load_reward_model(reward_dirs / name)
    assert type(scorer) is kind
    prompt, steps = chain_example()
    (scores,) = scorer.score([prompt], [steps])
    assert len(scores) == (1 if scorer.outcome else len(steps))
    assert all(0 <= s <= 1 for s in scores)
    # a batch of chains of other lengths scores each as it scores alone (padding changes nothing)
    batch = scorer.score([prompt, prompt], [steps[:1], steps])
    assert batch[0] == pytest.approx(scorer.score([prompt], [steps[:1]])[0], abs=1e-5)
    assert batch[1] == pytest.approx(scores, abs=1e-5)


def test_a_step_tag_score_is_p_good_against_p_bad(reward_dirs, tokenizer):
    scorer = load_reward_model(reward_dirs / "causal")
    prompt, steps = chain_example()
    encoded = encode_step_labels(tokenizer, prompt, steps)
    with torch.no_grad():
        logits = scorer.model(torch.tensor([encoded["input_ids"]])).logits[0]
    good, bad = tokenizer.convert_tokens_to_ids([GOOD_STEP, BAD_STEP])
    expected = [float(logits[p, [good, bad]].softmax(-1)[0]) for p in encoded["tag_positions"]]
    assert scorer.score([prompt], [steps])[0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("name", ["ours", "causal", "token"])
def test_a_scoring_pass_costs_what_the_counter_says(reward_dirs, tokenizer, name):
    scorer = load_reward_model(reward_dirs / name)
    prompt, steps = chain_example()
    ids = torch.tensor([encode_step_labels(tokenizer, prompt, steps)["input_ids"]])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        scorer.model(input_ids=ids, **scorer.forward_kwargs)
    measured = counter.get_total_flops()
    assert abs(scorer.flops(prompt, steps) - measured) / measured < 0.05


def test_reward_model_bad_input(reward_dirs, tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no reward model"):
        load_reward_model(tmp_path / "empty")
    scorer = load_reward_model(reward_dirs / "ours")
    with pytest.raises(ValueError, match="reward model's tokenizer \\(reading the policy's text\\) cannot represent"):
        scorer.check_text("20314.13024?<think>", "policy")  # permutation text: '0'-'4', '.' are outside
    with pytest.raises(ValueError, match="step tag '##' is not one token"):
        load_reward_model(reward_dirs / "causal", step_tag="##")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate([0.5], "mean")


def test_aggregations_and_weighted_best_of_n_by_hand():
    assert aggregate([0.9, 0.2, 0.5], "last") == 0.5
    assert aggregate([0.9, 0.2, 0.5], "min") == 0.2
    assert aggregate([0.9, 0.2, 0.5], "prod") == pytest.approx(0.09)
    answers, rewards = ["a", "b", "b", "c", None], [0.9, 0.3, 0.4, 0.1, 5.0]
    assert weighted_vote(answers, rewards) == "a"  # 0.9 against b's 0.7 (majority vote would say b)
    assert weighted_vote(answers, [0.5, 0.3, 0.4, 0.1, 0.0]) == "b"
    assert weighted_vote([None], [1.0]) is None


# --- search strategies ---------------------------------------------------------------------------------------------


class ScriptedPolicy(StepPolicy):
    """A policy test double: each step is drawn uniformly (torch's RNG) from fixed candidates, the answer is "e";
    it records every continuation it hands out, as (context length, new tokens)."""

    candidates = ["b;", "c;", "d;", THINK_END]

    def _continue(self, rows, max_new, stops, sample):
        encoded = [self.tokenizer(c, add_special_tokens=False).input_ids for c in self.candidates]
        out = ([encoded[int(i)] for i in torch.randint(len(encoded), (len(rows),))] if sample
               else [self.tokenizer("e<eos>", add_special_tokens=False).input_ids for _ in rows])
        self.calls += [(len(row), len(new)) for row, new in zip(rows, out)]
        return out


class PrefersStep(RewardModel):
    """A reward-model test double: a step scores 1 if it is `liked`, else 0 (the answer step 0.5); scoring a chain
    costs 1000 FLOPs per step."""

    def __init__(self, liked: str = "b;"):
        self.liked, self.calls = liked, 0

    def score_with_flops(self, prompts, chains):
        self.calls += len(chains)
        return [([0.5 if s.startswith(THINK_END) else float(s == self.liked) for s in steps], self.flops(None, steps))
                for steps in chains]

    def flops(self, prompt, steps):
        return 1000 * len(steps)

    def read(self, logits, tag_positions, length):
        raise NotImplementedError


def scripted(strategy, tokenizer, budgets, **options):
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig.preset("debug", vocab_size=len(tokenizer))).eval()
    search = strategy(model, tokenizer, PrefersStep(), "pointer", budgets, depth=2, max_steps=1000,
                      max_thinking=10_000, **options)
    search.policy = ScriptedPolicy(model, tokenizer, "pointer", depth=2, max_steps=1000, max_thinking=10_000)
    search.policy.calls = []
    return search


def liked_share(leaves) -> float:
    thinking = [s for node in leaves for s in node.steps if not s.startswith(THINK_END)]
    return sum(s == "b;" for s in thinking) / len(thinking)


@pytest.mark.parametrize("strategy, options", [(BeamSearch, {"beam_width": 2}), (REBASE, {"temperature_rebase": 0.05}),
                                               (DVTS, {"beam_width": 4})])
def test_search_follows_the_steps_the_reward_model_rewards(tokenizer, strategy, options):
    """Sampled blindly, a quarter of the thinking steps would be "b;" (the liked one; about 500 steps here, so a
    blind share stays within 0.25 +- 0.06); search keeps to it (0.55-0.75 measured)."""
    search = scripted(strategy, tokenizer, [8], **options)
    problems = get_task("pointer").problems(3, 20, seed=0)
    leaves, _, _ = search.search(problems, 8)
    assert all(len(mine) == 8 for mine in leaves)  # N leaves per problem
    assert liked_share([leaf for mine in leaves for leaf in mine]) > 0.45


def test_beam_search_keeps_the_best_nodes_and_dvts_the_best_of_each_subtree():
    live = [Node(0, scores=[s], subtree=t) for s, t in ((0.1, 0), (0.2, 0), (0.8, 1), (0.9, 1))]
    beam = BeamSearch.__new__(BeamSearch)
    beam.beam_width, beam.aggregation = 2, "last"
    assert [(n.scores[0], c) for n, c in beam.select(live, [], 4)] == [(0.9, 2), (0.8, 2)]
    dvts = DVTS.__new__(DVTS)
    dvts.beam_width, dvts.aggregation = 2, "last"
    # each subtree goes on from its own best node, however much better the other subtree scores
    assert [(n.scores[0], c) for n, c in dvts.select(live, [], 4)] == [(0.2, 2), (0.9, 2)]
    done = Node(0, subtree=0, done=True)
    assert [(n.scores[0], c) for n, c in dvts.select(live, [done], 4)] == [(0.2, 1), (0.9, 2)]


def test_rebase_splits_the_budget_by_softmax_of_reward_over_temperature():
    rewards, temperature, budget = [0.9, 0.6, 0.5, 0.1], 0.2, 20
    counts = softmax_allocation(rewards, budget, temperature)
    weights = [math.exp(r / temperature) for r in rewards]
    shares = [budget * w / sum(weights) for w in weights]
    assert sum(counts) == budget and all(abs(c - s) < 1 for c, s in zip(counts, shares))
    assert counts == sorted(counts, reverse=True)
    assert softmax_allocation([0.3, 0.3, 0.3, 0.3], 8, 1.0) == [2, 2, 2, 2]
    assert softmax_allocation([0.9, 0.1], 10, 1e-3) == [10, 0]  # a cold softmax is greedy
    with pytest.raises(ValueError, match="temperature must be > 0"):
        softmax_allocation([0.5], 1, 0.0)


@pytest.mark.parametrize("strategy, options", [(BeamSearch, {"beam_width": 2}), (DVTS, {"beam_width": 2}),
                                               (REBASE, {})])
def test_every_strategy_costs_what_the_counter_says_for_what_it_generated_and_scored(tokenizer, strategy, options):
    search = scripted(strategy, tokenizer, [4], **options)
    problems = get_task("pointer").problems(3, 3, seed=1)
    (row,) = search.run(problems, 4)
    model = search.policy.model
    prompts = sum(causal_lm_forward_flops(model, len(tokenizer(get_task("pointer").prompt(p, cot=True)).input_ids),
                                          0, 1, 2) for p in problems)
    generated = sum(causal_lm_extend_flops(model, context, new, 2) for context, new in search.policy.calls)
    assert row["policy_flops"] * len(problems) == prompts + generated
    assert row["reward_flops"] > 0 and row["flops_per_problem"] == row["policy_flops"] + row["reward_flops"]
    assert row["reward_flops"] * len(problems) == 1000 * sum(
        len(steps) for steps in scored_chains(search, problems))


def scored_chains(search, problems):
    """Every chain the search scored, by running it again with a recording reward model (the same seed)."""
    recorded = []
    double = search.reward_model
    original = double.score_with_flops

    def record(prompts, chains):
        recorded.extend(chains)
        return original(prompts, chains)

    double.score_with_flops = record
    search.policy.calls = []
    search.run(problems, 4)
    return recorded


def test_search_bad_input(tokenizer):
    with pytest.raises(ValueError, match="N must be a multiple of the beam width M = 4"):
        scripted(BeamSearch, tokenizer, [2, 8], beam_width=4)
    with pytest.raises(ValueError, match="beam width M must be >= 1"):
        scripted(DVTS, tokenizer, [4], beam_width=0)
    with pytest.raises(ValueError, match="N must be >= 1"):
        scripted(REBASE, tokenizer, [0])


# --- Math-Shepherd labels -----------------------------------------------------------------------------------------


def test_rollout_labels_call_a_step_good_when_a_rollout_from_it_reaches_the_answer(monkeypatch, tokenizer):
    """A scripted policy: from a chain whose steps are all right it completes with the right answer in one of two
    rollouts; from a wrong step on, with a wrong one. Math-Shepherd's hard labels and success shares follow."""
    from recurrent_lm.eval import step_labels

    task = get_task("pointer")
    problem = task.problems(3, 1, seed=4)[0]
    gold = task.solution_steps(problem)
    steps = gold[:1] + [task.corrupt_step(gold[1], random.Random(0))] + gold[2:]
    prompt = len(tokenizer(task.prompt(problem, cot=True)).input_ids)

    def scripted(model, tok, rows, max_new, stops, processors, kwargs):
        out = []
        for index, row in enumerate(rows):
            written = tok.decode(row[prompt:])
            right = written in ("".join(gold[: i + 1]) for i in range(len(gold))) and index % 2 == 0
            answer = problem.answer if right else "a" if problem.answer != "a" else "b"
            out.append(tok(f"{THINK_END}{answer}<eos>", add_special_tokens=False).input_ids)
        return out

    monkeypatch.setattr(step_labels, "generate_until", scripted)
    labels, shares = step_labels.rollout_labels(None, tokenizer, problem, steps, rollouts=2)
    assert labels == [True, False, False, True]  # the answer step keeps its own (right) answer
    assert shares == [0.5, 0.0, 0.0, 1.0]
    assert task.step_labels(problem, steps) == [True, False, False, True]


def test_label_steps_writes_chains_that_training_reads(tmp_path):
    from recurrent_lm.data import load_step_chains
    from recurrent_lm.eval.step_labels import label_steps

    summary = label_steps("demo-cot", "permutation", difficulties="1-2", n=2, samples=2, out=tmp_path / "labels")
    chains = load_step_chains(tmp_path / "labels" / "chains.jsonl")
    assert len(chains) == summary["chains"] == 8
    for problem, steps, labels in chains:
        assert labels == get_task("permutation").step_labels(problem, steps)
    (tmp_path / "bad.jsonl").write_text('{"problem": {"task": "pointer"}, "steps": [], "labels": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a labelled chain"):
        load_step_chains(tmp_path / "bad.jsonl")
