"""Token-level baselines (budget forcing, majority vote, best-of-n), their metrics, and `rlm compare`."""

import csv
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from recurrent_lm import RecurrentConfig, RecurrentLM
from recurrent_lm.eval.budget_forcing import best_of_n, budget_forced_generate, majority_vote, s1_metrics
from recurrent_lm.eval.compare import compare
from recurrent_lm.eval.cot import cot_runs
from recurrent_lm.flops import causal_lm_generation_flops
from recurrent_lm.tasks import get_task, task_tokenizer
from recurrent_lm.tokenization import THINK_END, character_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyzW0123456789=+-*;?"


def llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                        num_hidden_layers=2, max_position_embeddings=256, bos_token_id=1,
                                        eos_token_id=2, pad_token_id=0)).eval()


class AlwaysEndsThinking(LlamaForCausalLM):
    """A test double: a Llama that always wants to close its thinking right away."""

    end_id = None

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits[..., self.end_id] += 100.0
        return out


@pytest.fixture(scope="module")
def tokenizer():
    return character_tokenizer(ALPHABET)


def prompts(n=12):
    task = get_task("chain")
    return [task.prompt(p, cot=True) for p in task.problems(2, n, seed=5)]


@pytest.mark.parametrize("budget", [0, 1, 3, 7])
def test_thinking_never_exceeds_the_budget_and_the_answer_phase_always_runs(tokenizer, budget):
    model = llama(len(tokenizer))
    for sampled in (False, True):
        torch.manual_seed(1)
        results = budget_forced_generate(model, tokenizer, prompts(), max_thinking=budget, max_answer_tokens=3,
                                         do_sample=sampled, top_k=0)
        lengths = [len(r.thinking_ids) for r in results]
        assert all(length <= budget for length in lengths)  # Control = 100%
        assert all(len(r.answer_ids) >= 1 for r in results)
        assert s1_metrics({budget: 0.0}, {budget: lengths})["control"] == 1.0


def test_wait_replaces_the_end_of_thinking_the_asked_number_of_times(tokenizer):
    torch.manual_seed(0)
    model = AlwaysEndsThinking(llama(len(tokenizer)).config).eval()
    model.end_id = tokenizer.convert_tokens_to_ids(THINK_END)
    wait = tokenizer("Wait", add_special_tokens=False).input_ids
    for waits in (0, 1, 3):
        results = budget_forced_generate(model, tokenizer, prompts(4), max_thinking=40, num_waits=waits,
                                         max_answer_tokens=2)
        for r in results:
            assert r.waits_inserted == waits and r.thinking_ids == wait * waits
            assert not r.cut_by_budget and len(r.answer_ids) >= 1
    # minimum: the end of thinking is suppressed until 5 tokens were thought
    results = budget_forced_generate(model, tokenizer, prompts(4), max_thinking=40, min_thinking=5, max_answer_tokens=2)
    assert all(len(r.thinking_ids) == 5 for r in results)
    # a budget too small for another "Wait" ends the thinking instead
    results = budget_forced_generate(model, tokenizer, prompts(2), max_thinking=5, num_waits=3, max_answer_tokens=2)
    assert all(r.waits_inserted == 1 and len(r.thinking_ids) <= 5 for r in results)


def test_budget_forcing_bad_input(tokenizer):
    model = llama(len(tokenizer))
    with pytest.raises(ValueError, match="budget must be >= 0"):
        budget_forced_generate(model, tokenizer, prompts(1), max_thinking=-1)
    with pytest.raises(ValueError, match="min_thinking"):
        budget_forced_generate(model, tokenizer, prompts(1), max_thinking=2, min_thinking=3)
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<pad>", "<bos>", "<eos>", *ALPHABET])}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    with pytest.raises(ValueError, match="thinking delimiter"):
        budget_forced_generate(model, plain, ["a=1;a?"], max_thinking=4)


def test_majority_vote_and_best_of_n_on_hand_made_samples():
    assert majority_vote(["3", "4", "3", None, "4", "4"]) == "4"
    assert majority_vote(["3", "4"]) == "3"  # a tie goes to the answer seen first
    assert majority_vote([None, None]) is None
    assert best_of_n(["3", "4", "5"], [-2.0, -0.5, -1.0]) == "4"
    assert best_of_n(["3", "4", "3"], [-0.6, -0.5, -0.6], weighted=True) == "3"
    assert best_of_n([None, "4"], [0.0, -9.0]) == "4"


def test_s1_metrics_by_hand():
    metrics = s1_metrics({0: 0.2, 10: 0.4, 20: 0.5}, {0: [0, 0], 10: [4, 12], 20: [20, 3]}, min_thinking=0)
    assert metrics["control"] == 5 / 6
    assert metrics["scaling"] == pytest.approx(((0.4 - 0.2) / 10 + (0.5 - 0.2) / 20 + (0.5 - 0.4) / 10) / 3)
    assert metrics["performance"] == 0.5


def test_flops_of_a_cot_answer_are_the_counters_value_for_its_tokens(tokenizer):
    task = get_task("chain")
    problems = task.problems(2, 3, seed=2)
    for model, depth in ((llama(len(tokenizer)), None),
                         (RecurrentLM(RecurrentConfig.preset("debug", vocab_size=len(tokenizer))).eval(), 2)):
        for answer, result, flops in (run[0] for run in cot_runs(model, tokenizer, problems, budget=6, depth=depth)):
            assert flops == causal_lm_generation_flops(model, result.prompt_tokens, result.new_tokens, depth)
            assert result.new_tokens == len(result.thinking_ids) + 1 + len(result.answer_ids)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    tokenizer = task_tokenizer(["chain"])
    torch.manual_seed(0)
    RecurrentLM(RecurrentConfig.preset("debug", vocab_size=len(tokenizer))).save_pretrained(root / "latent")
    llama(len(tokenizer)).save_pretrained(root / "cot")  # the CoT baseline may be any transformers causal LM
    for name in ("latent", "cot"):
        tokenizer.save_pretrained(root / name)
    return root


def test_compare_writes_every_file(models, tmp_path):
    result = compare(models / "latent", models / "cot", task="chain", difficulties="1,3", n=4, out=tmp_path / "out",
                     steps="1,2", exit_thresholds=[1e-2], budgets="0,4", votes="1,2", temperature=0.8)
    out = tmp_path / "out"
    for name in ("results.json", "results.csv", "s1_metrics.csv", "summary.md", "accuracy_vs_flops.png",
                 "accuracy_vs_depth.png", "accuracy_vs_budget.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"] for r in rows} == {"latent", "latent-exit", "latent-oracle", "cot-budget", "cot-vote",
                                           "cot-best-of-n"}
    assert {"accuracy", "ci_low", "ci_high", "flops_per_problem", "generated_tokens", "wall_seconds"} <= set(rows[0])
    assert len(result["s1_metrics"]) == 2 and all(m["control"] == 1.0 for m in result["s1_metrics"])
    votes = {int(r["samples"]): float(r["flops_per_problem"]) for r in rows if r["method"] == "cot-vote" and r["difficulty"] == "1"}
    assert votes[2] > votes[1]  # two samples cost more than one


def test_compare_bad_input(models, tmp_path):
    with pytest.raises(ValueError, match="budgets must be >= 0"):
        compare(models / "latent", models / "cot", task="chain", budgets="-1,4", out=tmp_path / "a")
    other = tmp_path / "parity-tokenizer"
    task_tokenizer(["parity"]).save_pretrained(other)
    with pytest.raises(ValueError, match="latent model's tokenizer \\(task 'chain'\\) cannot represent"):
        compare(models / "latent", models / "cot", task="chain", n=2, latent_tokenizer=other, out=tmp_path / "b")


def test_one_threshold_grid_serves_every_criterion():
    """Sweep and compare ask recurrent_lm.adaptive.threshold_grid: argmax-stability counts whole steps, the others
    scale their default; every threshold it gives is one AdaptiveExit accepts."""
    from recurrent_lm.adaptive import CRITERIA, DEFAULT_THRESHOLDS, AdaptiveExit, threshold_grid

    assert threshold_grid("argmax-stability") == [2, 3, 5, 8]
    assert threshold_grid("kl") == pytest.approx([1e-2, 1e-3, 1e-4, 1e-5])
    assert threshold_grid("kl", [0.5]) == [0.5]
    for criterion in CRITERIA:
        grid = threshold_grid(criterion)
        assert DEFAULT_THRESHOLDS[criterion] in grid or criterion == "argmax-stability"
        assert all(AdaptiveExit(criterion, t).limit == t for t in grid)
    with pytest.raises(ValueError, match="must be an integer"):
        threshold_grid("argmax-stability", [0.5])
    with pytest.raises(ValueError, match="unknown exit criterion"):
        threshold_grid("vibes")


def test_compare_runs_argmax_stability_at_whole_steps(models, tmp_path):
    """`rlm compare --exit_criterion argmax-stability` once asked AdaptiveExit for a threshold of 0.5 steps."""
    result = compare(models / "latent", models / "cot", task="chain", difficulties="1", n=2, out=tmp_path / "out",
                     steps="1,4", exit_criterion="argmax-stability", budgets="0", votes="")
    exits = [r for r in result["rows"] if r["method"] == "latent-exit"]
    assert [r["threshold"] for r in exits] == [2, 3, 5, 8]
    assert all(r["criterion"] == "argmax-stability" and r["steps"] == 4 for r in exits)


def test_rejection_sampling_pays_for_every_draw_until_one_fits(tokenizer):
    from recurrent_lm.eval.cot import ChainPool, RejectionSampling

    problems = get_task("chain").problems(2, 4, seed=3)
    pool = ChainPool(llama(len(tokenizer)), tokenizer, samples=6, budget=12, temperature=1.0)
    method = RejectionSampling(pool, [0, 3, 10_000], tries=4)
    torch.manual_seed(0)
    rows = {row["budget"]: row for budget in method.budgets for row in method.run(problems, budget)}
    draws = [runs[:4] for runs in pool.runs(problems)[0]]
    for budget, row in rows.items():
        expected_flops, fits = [], []
        for chains in draws:
            first = next((i for i, r in enumerate(chains) if len(r.result.thinking_ids) <= budget), None)
            fits.append(first is not None)
            expected_flops.append(sum(r.flops for r in chains[: first + 1 if first is not None else len(chains)]))
        assert row["flops_per_problem"] == pytest.approx(sum(expected_flops) / len(problems))
        assert row["control"] == sum(fits) / len(fits)
    assert rows[10_000]["mean_tries"] == 1 and rows[10_000]["control"] == 1.0  # the first draw always fits
    assert rows[0]["flops_per_problem"] >= rows[3]["flops_per_problem"] >= rows[10_000]["flops_per_problem"]
    metrics = method.s1_metrics(list(rows.values()), difficulty=2)
    assert metrics["method"] == "cot-rejection" and 0 <= metrics["control"] <= 1


@pytest.fixture(scope="module")
def prm(tmp_path_factory):
    """A reward model of this project's step-tag kind, random, saved locally."""
    path = tmp_path_factory.mktemp("prm")
    prm_tokenizer = task_tokenizer(["chain"], "#")  # "+" and "-" are chain characters already
    torch.manual_seed(1)
    RecurrentLM(RecurrentConfig.preset("debug", vocab_size=len(prm_tokenizer), mean_recurrence=1)).save_pretrained(path)
    prm_tokenizer.save_pretrained(path)
    return path


def test_compare_runs_search_methods_and_names_the_compute_optimal_one(models, prm, tmp_path):
    """Every search family on the same problems, with a reward model saved locally (this project's step-tag kind):
    rows for each, the reward model's FLOPs apart, the oracle row marked, a compute-optimal table."""
    result = compare(models / "latent", models / "cot", task="chain", difficulties="2", n=3, out=tmp_path / "out",
                     steps="2", exit_criterion=None, budgets="4,8", votes="2,4", temperature=1.0,
                     methods="latent,rejection,majority,weighted-best-of-n,beam,dvts,rebase,oracle",
                     reward_model=prm, search_max_steps=3)
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"latent", "cot-rejection", "cot-vote", "prm-best-of-n", "prm-weighted-best-of-n", "beam",
                       "dvts", "rebase", "oracle-best-of-n"}
    for row in result["rows"]:
        if row["method"] in ("beam", "dvts", "rebase", "prm-best-of-n", "prm-weighted-best-of-n"):
            assert row["reward_flops"] > 0
            assert row["flops_per_problem"] == pytest.approx(row["policy_flops"] + row["reward_flops"])
    assert all(r.get("oracle") for r in result["rows"] if r["method"] == "oracle-best-of-n")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Compute-optimal methods" in summary and "cot-rejection" in summary
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(row["best_method"] != "oracle-best-of-n" for row in saved["compute_optimal"])


def test_compare_methods_bad_input(models, tmp_path):
    with pytest.raises(ValueError, match="unknown \\['beams'\\]"):
        compare(models / "latent", models / "cot", task="chain", methods="latent,beams", out=tmp_path / "a")
    with pytest.raises(ValueError, match="beam,rebase need a reward model"):
        compare(models / "latent", models / "cot", task="chain", methods="beam,rebase", out=tmp_path / "b")


def test_token_conditional_control_asks_for_the_budget_in_the_prompt_and_enforces_nothing():
    from recurrent_lm.data import prompt_ids
    from recurrent_lm.eval.cot import TokenConditional

    tokenizer = character_tokenizer(ALPHABET + "[]")
    problems = get_task("chain").problems(2, 3, seed=3)
    method = TokenConditional(llama(len(tokenizer)), tokenizer, [2, 6], cap=9)
    for budget in (2, 6):
        (row,) = method.run(problems, budget)
        lengths = method.thinking_lengths[(2, budget)]
        assert all(length <= 9 for length in lengths)  # the cap, not the budget asked for, bounds the thinking
        assert row["control"] == sum(length <= budget for length in lengths) / len(lengths)
    ((run, *_),) = cot_runs(method.model, tokenizer, problems[:1], 9, None, stated_budget=6)
    assert run.result.prompt_tokens == len(prompt_ids(tokenizer, problems[0], cot=True, thinking_budget=6))
    assert tokenizer.decode(prompt_ids(tokenizer, problems[0], cot=True, thinking_budget=6)).endswith("?[6]<think>")


def test_token_conditional_needs_a_tokenizer_that_states_the_budget(models, tmp_path):
    with pytest.raises(ValueError, match="token-conditional CoT model's tokenizer \\(task 'parity'\\) cannot represent"):
        compare(models / "latent", models / "cot", task="parity", methods="token-conditional", n=2,
                out=tmp_path / "a", latent_tokenizer=models / "latent")


def test_search_over_a_recurrent_cot_model_runs_the_depth_by_n_grid(models, prm, tmp_path):
    """The hybrid: step-level search over a recurrent-depth CoT model, its depth per step a second knob."""
    result = compare(models / "latent", models / "latent", task="chain", difficulties="2", n=2, out=tmp_path / "out",
                     steps="1", exit_criterion=None, budgets="6", votes="2,4", cot_steps="1,3",
                     methods="beam,rebase", reward_model=prm, search_max_steps=2)
    grid = {(r["method"], r["steps"], r["samples"]): r for r in result["rows"]}
    assert set(grid) == {(m, d, n) for m in ("beam", "rebase") for d in (1, 3) for n in (2, 4)}
    for method in ("beam", "rebase"):  # deeper steps cost more per policy token
        deep, shallow = grid[(method, 3, 4)], grid[(method, 1, 4)]
        assert deep["policy_flops"] / deep["generated_tokens"] > shallow["policy_flops"] / shallow["generated_tokens"]
