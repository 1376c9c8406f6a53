"""`rlm demo --quick`: the whole pipeline (train, sweep, compare, report) on tiny budgets."""

import csv
import json

import pytest

from recurrent_lm.cli import main


def test_quick_demo_writes_the_report_and_every_promised_file(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--quick", "--seed", "3", "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    names = ["report.md", "results.json"]
    for study, (latent, cot) in {"permutation": ("demo-latent", "demo-cot"),
                                 "extrapolation": ("pointer-latent", "pointer-cot")}.items():
        names += [f"{study}-{plot}.png" for plot in ("accuracy_vs_flops", "accuracy_vs_depth", "accuracy_vs_budget",
                                                     "logit_lens")]
        names += [f"{study}/compare/results.csv", f"{study}/compare/s1_metrics.csv", f"{study}/sweep/results.csv",
                  f"{study}/mixed/sweep/results.csv", f"{study}/mixed/problems.jsonl",
                  f"{study}-mixed-accuracy_vs_flops.png",
                  f"train/{latent}/model/manifest.json", f"train/{cot}/model/manifest.json"]
    names.append("train/demo-exit-gate/model/manifest.json")  # the gate learns on the latent model just trained
    names += ["train/demo-prm/model/manifest.json", "permutation/search/results.csv",
              "permutation-search-accuracy_vs_flops.png"]
    for name in names:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert {"findings", "studies", "wall_seconds"} <= set(results)
    permutation, pointer = results["studies"]["permutation"], results["studies"]["extrapolation"]
    assert {"findings", "compare", "sweep", "s1_metrics", "manifests", "overlap"} <= set(permutation)
    assert {r["method"] for r in permutation["compare"]} == {"latent", "latent-exit", "latent-oracle", "cot-budget",
                                                            "cot-vote", "cot-best-of-n"}
    assert {r["difficulty"] for r in permutation["compare"]} == {1, 2, 6}  # 6: harder than any trained
    assert {r["difficulty"] for r in pointer["compare"]} == {2, 8} and pointer["task"] == "pointer"
    assert {r["criterion"] for r in permutation["compare"] if r["method"] == "latent-exit"} == {"gate"}
    search = permutation["search"]
    assert {r["method"] for r in search["compare"]} >= {"beam", "dvts", "rebase", "prm-weighted-best-of-n",
                                                         "oracle-best-of-n", "cot-vote", "latent"}
    assert {r["chains"] for r in search["reward_model_accuracy"]} == {"corrupted", "policy (T=1)"}
    assert len(search["findings"]) == 2 and all(line in report_text(out) for line in search["findings"])
    gate = permutation["manifests"]["exit gate"]
    assert "--model.init_from" in gate["command"] and "train/demo-latent/model" in gate["command"]
    manifest = permutation["manifests"]["latent"]
    assert {"config", "seed", "command", "machine", "wall_seconds", "final_metrics"} <= set(manifest)
    assert manifest["seed"] == 3 and "--data.seed 3" in manifest["command"]
    columns = next(csv.DictReader(open(out / "permutation" / "compare" / "results.csv"))).keys()
    assert {"method", "setting", "difficulty", "accuracy", "ci_low", "ci_high", "flops_per_problem"} <= set(columns)
    report = (out / "report.md").read_text()
    assert "![accuracy against FLOPs](extrapolation-accuracy_vs_flops.png)" in report and "Quick mode" in report
    assert all(line.split(": ", 1)[1] in report for line in results["findings"])
    assert "`rlm demo --quick --seed 3`" in report
    for study, problems in ((permutation, 4 * 2), (pointer, 2 * 2)):  # the mixed set's frontier, from the data
        frontier = study["mixed"]["frontier"]
        assert frontier["difficulty"] == "mixed" and study["mixed"]["problems"] == problems and frontier["baseline_steps"]
        assert all(line in report for line in study["mixed"]["findings"])
    assert "adaptive depth on a mixed-difficulty set" in report
    # quick training draws 16 x 12 problems: at k = 1 (120 distinct problems) some overlap is expected, at k = 2 not
    assert [line.split(":")[0] for line in permutation["overlap"]] == ["k = 1"]


def report_text(out) -> str:
    return (out / "report.md").read_text()


def test_training_overlap_is_named_where_a_difficulty_has_few_problems():
    from recurrent_lm.eval.demo import training_overlap

    manifest = {"config_text": "trainer: {max_steps: 3000}\ndata: {batch_size: 64, min_difficulty: 1, max_difficulty: 4}",
                "overrides": []}
    notes = training_overlap("permutation", [1, 2, 3, 4, 6], manifest)
    assert [n.split(":")[0] for n in notes] == ["k = 1", "k = 2", "k = 3"]  # 120, 14,400, 1.7M problems; 48,000 draws
    assert "about 100% of the held-out problems" in notes[0] and "about 96%" in notes[1] and "about 3%" in notes[2]
    assert notes[1].endswith("measures recall, not generalisation.") and notes[2].endswith("training problems.")
    assert training_overlap("pointer", [1, 2], manifest) == []  # 16-node tables: far too many to repeat
    manifest["overrides"] = ["--trainer.max_steps", "10"]
    few = training_overlap("permutation", [1, 2], manifest)  # 160 draws per difficulty
    assert few == [notes[0].replace("48,000", "160").replace("100%", "74%"),
                   notes[1].replace("48,000", "160").replace("96%", "1%").replace("only ", "").replace(": this number measures recall, "
                                                                                "not generalisation.", ".")]


def test_findings_are_computed_from_the_measurements():
    from recurrent_lm.eval.compare import measured_findings

    def row(method, knob, value, accuracy, low, high, flops):
        return {"method": method, knob: value, "difficulty": 2, "accuracy": accuracy, "ci_low": low,
                "ci_high": high, "flops_per_problem": flops, "setting": f"{knob}={value}"}

    rows = [row("latent", "steps", 1, 0.1, 0.05, 0.2, 1e6), row("latent", "steps", 8, 0.9, 0.8, 0.95, 8e6),
            row("cot-budget", "budget", 0, 0.2, 0.1, 0.3, 2e6), row("cot-budget", "budget", 16, 0.25, 0.15, 0.35, 9e6)]
    lines = measured_findings(rows)
    assert "latent model: accuracy 0.10 at steps 1, best 0.90 at steps 8: rises with depth." in lines[0]
    assert lines[1].endswith("no significant rise with the thinking budget.")  # overlapping intervals
    # target 0.81 (90% of the best, 0.90): only latent reaches it
    assert lines[2] == ("Difficulty 2: FLOPs per problem to reach 0.81 accuracy (90% of the best, 0.90): latent 8e+06 "
                        "(steps=8, 0.90); never reached by cot-budget.")
    rows.append(row("cot-vote", "budget", 16, 0.85, 0.8, 0.9, 4e6))
    assert measured_findings(rows)[2].endswith("cot-vote 4e+06 (budget=16, 0.85); latent 8e+06 (steps=8, 0.90); "
                                               "never reached by cot-budget. Chain of thought is 2.0x cheaper than "
                                               "latent depth here.")
    for r in rows:
        r["accuracy"] = min(r["accuracy"], 0.1)
    assert measured_findings(rows)[2].startswith("Difficulty 2: no method reaches 0.2 accuracy")


def test_shipped_checkpoints_load_and_carry_their_manifests():
    from recurrent_lm.eval.demo import CHECKPOINTS
    from recurrent_lm.loading import load_model, load_tokenizer

    for name in ("demo-latent", "demo-cot", "demo-exit-gate", "pointer-latent", "pointer-cot"):
        path = CHECKPOINTS / name
        model, tokenizer = load_model(path), load_tokenizer(path)
        assert model.config.vocab_size >= len(tokenizer)
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["config"] == f"configs/{name}.yaml" and "rlm train" in manifest["command"]
        assert max(v for k, v in manifest["final_metrics"].items() if k.startswith("val/acc_r")) > 0


@pytest.mark.slow
def test_full_demo_on_the_shipped_checkpoints_shows_the_promised_effects(tmp_path):
    """`rlm demo` itself (about 12 minutes on 2 cores): the shipped models show what the README says they show."""
    from recurrent_lm.eval.demo import demo

    rows = demo(tmp_path / "demo")["rows"]

    def accuracy(study, method, knob, value, difficulty):
        (match,) = [r for r in rows[study] if r["method"] == method and r.get(knob) == value
                    and r["difficulty"] == difficulty]
        return match

    for difficulty, depth in ((3, 2), (4, 3)):  # in-distribution: near chance at r=1, high at the training depth
        low, high = (accuracy("permutation", "latent", "steps", r, difficulty) for r in (1, depth))
        assert low["ci_high"] < high["ci_low"] and high["accuracy"] >= 0.9
    assert accuracy("permutation", "latent", "steps", 4, 5)["accuracy"] >= 0.4  # one beyond training
    for difficulty in (1, 2, 3, 4):  # the CoT model rises with its thinking budget
        assert accuracy("permutation", "cot-budget", "budget", 0, difficulty)["accuracy"] <= 0.1
        assert accuracy("permutation", "cot-budget", "budget", 12 * difficulty, difficulty)["accuracy"] >= 0.9
    search = [r for r in rows["permutation-search"]]
    assert {r["difficulty"] for r in search} == {4, 5} and all(r["reward_flops"] > 0 for r in search
                                                             if r["method"] in ("beam", "dvts", "rebase"))
    for difficulty in (8, 10, 12):  # twice the hardest trained and more: solved by depth, not at the training depth
        assert accuracy("extrapolation", "latent", "steps", 4, difficulty)["accuracy"] <= 0.3
        assert max(accuracy("extrapolation", "latent", "steps", r, difficulty)["accuracy"] for r in (12, 16, 24)) >= 0.8


def test_shipped_pointer_model_thinks_longer_than_it_was_trained_to():
    """The extrapolation bar on the shipped model, on fresh problems (not the ones the benchmark reports): trained
    on 1-4 hops at depths <= 6, it solves 8 hops with more depth, and not at its training depth 4 (16 s here)."""
    from recurrent_lm.answering import accuracy, answer_problems
    from recurrent_lm.eval.demo import CHECKPOINTS
    from recurrent_lm.loading import load_model, load_tokenizer
    from recurrent_lm.tasks import get_task

    model, tokenizer = load_model(CHECKPOINTS / "pointer-latent"), load_tokenizer(CHECKPOINTS / "pointer-latent")
    problems = get_task("pointer").problems(8, 200, seed=31337)
    at = {r: accuracy(answer_problems(model, tokenizer, problems, num_steps=r, init_scale=0.0)) for r in (4, 8, 16)}
    assert at[4] <= 0.3 and at[8] >= 0.8 and at[16] >= 0.8


@pytest.mark.slow
def test_extrapolation_bar_holds_on_fresh_problems_at_every_harder_difficulty():
    """The issue's bar on the shipped pointer model, on 200 problems per k from a seed neither the demo (1234) nor the
    benchmark (777001) uses: at 2x, 2.5x and 3x the hardest trained k, >= 0.8 with more depth and <= 0.3 at the
    training depth (about a minute on 2 cores)."""
    from recurrent_lm.answering import accuracy, answer_problems
    from recurrent_lm.eval.demo import CHECKPOINTS
    from recurrent_lm.loading import load_model, load_tokenizer
    from recurrent_lm.tasks import get_task

    model, tokenizer = load_model(CHECKPOINTS / "pointer-latent"), load_tokenizer(CHECKPOINTS / "pointer-latent")
    training_depth = model.config.mean_recurrence
    for k in (8, 10, 12):
        problems = get_task("pointer").problems(k, 200, seed=2718)
        at = {r: accuracy(answer_problems(model, tokenizer, problems, num_steps=r, init_scale=0.0))
              for r in (training_depth, 16, 24)}
        assert at[training_depth] <= 0.3 and max(at[16], at[24]) >= 0.8, (k, at)
