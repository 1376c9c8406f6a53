"""Test-time depth sweeps (`rlm sweep`)."""

import csv
import json

import pytest

from recurrent_lm.eval.sweep import sweep
from recurrent_lm.loading import load_model, load_tokenizer
from recurrent_lm.tasks import get_task, save_jsonl, task_tokenizer

from .test_train import train

COLUMNS = {"method", "setting", "criterion", "threshold", "difficulty", "steps", "n", "accuracy", "ci_low", "ci_high",
           "flops_per_problem", "generated_tokens", "mean_steps_per_token", "wall_seconds"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = train(tmp_path_factory.mktemp("sweep"), "--trainer.max_steps", "20", "--trainer.limit_val_batches", "0")
    return root / "model"


def test_sweep_writes_every_promised_file_and_column(trained, tmp_path):
    result = sweep(trained, task="chain", difficulties="1,3", steps="1,2,4", n=12, out=tmp_path / "out",
                   exit_criteria=["kl", "cosine"], exit_thresholds=[1e-2, 1e-4], dynamics=2)
    out = tmp_path / "out"
    for name in ("results.json", "results.csv", "summary.md", "accuracy_vs_steps.png", "accuracy_vs_flops.png",
                 "latent_change.png", "logit_lens.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert COLUMNS <= set(rows[0])
    fixed = [r for r in rows if r["method"] == "latent"]
    assert {(int(r["difficulty"]), int(r["steps"])) for r in fixed} == {(d, s) for d in (1, 3) for s in (1, 2, 4)}
    assert len([r for r in rows if r["method"] == "latent-exit"]) == 2 * 2 * 2
    flops = {int(r["steps"]): float(r["flops_per_problem"]) for r in fixed if r["difficulty"] == "1"}
    assert flops[1] < flops[2] < flops[4]  # deeper costs more
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == len(result["rows"]) and len(saved["dynamics"]) == 2
    assert "steps_histogram" in [r for r in saved["rows"] if r["method"] == "latent-exit"][0]
    summary = (out / "summary.md").read_text()
    assert "![accuracy_vs_flops.png](accuracy_vs_flops.png)" in summary and "| difficulty | steps |" in summary


def test_sweep_accuracy_equals_a_direct_generate_and_score_loop(trained, tmp_path):
    result = sweep(trained, task="chain", difficulties="2", steps="3", n=16, out=tmp_path / "out", exit_criteria=[],
                   dynamics=0)
    model, tokenizer = load_model(trained), load_tokenizer(trained)
    task = get_task("chain")
    correct = 0
    for problem in task.problems(2, 16, seed=1234):
        ids = tokenizer("<bos>" + task.prompt(problem), return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, num_steps=3, max_new_tokens=4, do_sample=False, init_scale=0.0,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:])
        correct += task.score(task.parse_answer(text), problem)
    assert result["rows"][0]["accuracy"] == correct / 16


def test_sweep_reads_a_problem_file_and_runs_on_converted_huginn(huginn_dir, tmp_path):
    tokenizer_dir = tmp_path / "tok"
    task_tokenizer(["chain"]).save_pretrained(tokenizer_dir)  # 45 tokens: within huginn-tiny's 256
    problems = save_jsonl(get_task("chain").problems(2, 5, seed=9), tmp_path / "set.jsonl")
    result = sweep(huginn_dir, problems=problems, difficulties="", steps="1,4", n=5, out=tmp_path / "out",
                   exit_criteria=["latent-diff"], tokenizer=tokenizer_dir, dynamics=1)
    assert {r["n"] for r in result["rows"]} == {5}


def test_bad_sweep_input(trained, huginn_dir, tmp_path):
    from .conftest import HUGINN_TINY

    with pytest.raises(ValueError, match="not a RecurrentLM"):
        sweep(HUGINN_TINY, task="chain", out=tmp_path / "a")
    with pytest.raises(ValueError, match="steps must all be >= 1"):
        sweep(trained, task="chain", steps="0,2", out=tmp_path / "b")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="problem set is empty"):
        sweep(trained, problems=empty, out=tmp_path / "c")
    sweep(trained, task="chain", difficulties="1", steps="1", n=2, exit_criteria=[], dynamics=0, out=tmp_path / "d")
    with pytest.raises(FileExistsError, match="--overwrite"):
        sweep(trained, task="chain", difficulties="1", steps="1", n=2, exit_criteria=[], out=tmp_path / "d")
    sweep(trained, task="chain", difficulties="1", steps="1", n=2, exit_criteria=[], dynamics=0, out=tmp_path / "d",
          overwrite=True)
    with pytest.raises(ValueError, match="unknown exit criteria"):
        sweep(trained, task="chain", exit_criteria=["vibes"], out=tmp_path / "e")


def test_sweep_command(trained, tmp_path, capsys):
    from recurrent_lm.cli import main

    main(["sweep", "--model", str(trained), "--task", "parity", "--difficulties", "1,2", "--steps", "1,2", "--n", "4",
          "--exit-criteria", "[]", "--dynamics", "0", "--out", str(tmp_path / "cli")])
    assert "wrote the results to" in capsys.readouterr().out
    assert (tmp_path / "cli" / "summary.md").is_file()


def test_a_mixed_set_is_one_set_with_its_oracle_and_the_saving_of_adaptive_exit(trained, tmp_path):
    """--mixed answers a shuffled problem file as one set (batches mix difficulties); the oracle takes each
    problem's smallest right depth; the frontier names the cheapest fixed depth within 1 point of the best and
    the saving of each adaptive setting within 1 point of it, all from the rows."""
    from recurrent_lm.cli import main

    ordered, shuffled = tmp_path / "ordered.jsonl", tmp_path / "mixed.jsonl"
    main(["tasks", "export", "chain", str(ordered), "--difficulties", "1-3", "--n", "4", "--seed", "5"])
    main(["tasks", "export", "chain", str(shuffled), "--difficulties", "1-3", "--n", "4", "--seed", "5",
          "--shuffle", "true"])
    lines = shuffled.read_text().splitlines()
    assert sorted(lines) == sorted(ordered.read_text().splitlines()) and lines != ordered.read_text().splitlines()
    result = sweep(trained, problems=shuffled, difficulties="", steps="1,2,4", n=12, mixed=True, batch_size=4,
                   exit_criteria=["cosine"], exit_thresholds=[0.3, 1e-3], out=tmp_path / "out", dynamics=0)
    rows = result["rows"]
    assert {r["difficulty"] for r in rows} == {"mixed"} and {r["n"] for r in rows} == {12}
    fixed = sorted((r for r in rows if r["method"] == "latent"), key=lambda r: r["steps"])
    (oracle,) = [r for r in rows if r["method"] == "latent-oracle"]
    by_hand_scores, by_hand_flops = [], []
    for i in range(12):
        right = [r for r in fixed if r["problem_scores"][i] > 0]
        chosen = right[0] if right else fixed[-1]
        by_hand_scores.append(chosen["problem_scores"][i])
        by_hand_flops.append(chosen["problem_flops"][i])
    assert oracle["accuracy"] == sum(by_hand_scores) / 12 >= max(r["accuracy"] for r in fixed)
    assert oracle["flops_per_problem"] == pytest.approx(sum(by_hand_flops) / 12)
    (frontier,) = json.loads((tmp_path / "out" / "results.json").read_text())["frontier"]
    best = max(r["accuracy"] for r in fixed)
    baseline = min((r for r in fixed if r["accuracy"] >= best - 0.01), key=lambda r: r["flops_per_problem"])
    assert frontier["baseline_steps"] == baseline["steps"] and frontier["best_fixed_accuracy"] == best
    for setting in frontier["adaptive_within_1_point"]:
        row = next(r for r in rows if r["setting"] == setting["setting"])
        assert row["accuracy"] >= baseline["accuracy"] - 0.01
        assert setting["flops_saving"] == pytest.approx(baseline["flops_per_problem"] / row["flops_per_problem"])
        assert setting["wall_saving"] == pytest.approx(baseline["wall_seconds"] / row["wall_seconds"])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## What adaptive exit saves (measured)" in summary and "Difficulty mixed:" in summary
    with pytest.raises(ValueError, match="--mixed true answers a problem file"):
        sweep(trained, task="chain", mixed=True, out=tmp_path / "none")
