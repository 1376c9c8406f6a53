"""The lm-evaluation-harness adapter, offline, on a local task YAML."""

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from recurrent_lm.eval.lm_eval import lm_eval_sweep  # noqa: E402
from recurrent_lm.eval.lm_eval_model import RecurrentLMEval  # noqa: E402
from recurrent_lm import RecurrentConfig, RecurrentLM  # noqa: E402
from recurrent_lm.tasks import task_tokenizer  # noqa: E402

TOY = Path(__file__).parent / "fixtures" / "lm_eval" / "toy.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("lm-eval") / "model"
    tokenizer = task_tokenizer(["chain"])
    torch.manual_seed(0)
    RecurrentLM(RecurrentConfig.preset("debug", vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_task(folder: Path, name: str, data: Path) -> Path:
    """A local multiple-choice lm-eval task over a JSONL file: no download (characters only, so no space before
    the answer)."""
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    higher_is_better: true
""")
    return folder


def permutation_choice_task(folder: Path) -> Path:
    """A local multiple-choice task "rlm_perm": 24 permutation problems (k = 1, 2), the composed permutation among
    four candidates (its digits shuffled)."""
    import random

    from recurrent_lm.data import heldout_problems
    from recurrent_lm.tasks import get_task

    rng, rows = random.Random(0), []
    for problem in heldout_problems(["permutation"], [1, 2], 12, seed=777):
        wrong = set()
        while len(wrong) < 3:
            candidate = "".join(rng.sample(problem.answer, len(problem.answer)))
            if candidate != problem.answer:
                wrong.add(candidate)
        choices = [problem.answer, *sorted(wrong)]
        rng.shuffle(choices)
        rows.append({"question": get_task("permutation").prompt(problem), "choices": choices,
                     "answer": choices.index(problem.answer)})
    data = folder / "perm.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_task(folder, "rlm_perm", data)
    return folder


@pytest.fixture
def task_dir(tmp_path):
    return write_task(tmp_path, "rlm_toy", TOY)


def test_every_call_runs_at_the_requested_depth(model_dir):
    from recurrent_lm.loading import load_model, load_tokenizer

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    request = Instance(request_type="loglikelihood", doc={}, arguments=("a=3;b=a+4;b?", "0"), idx=0)
    scores = {}
    for depth in (1, 4):
        harness = RecurrentLMEval(pretrained=model, tokenizer=tokenizer, num_steps=depth, batch_size=1)
        scores[depth] = harness.loglikelihood([request])[0][0]
    assert scores[1] != scores[4]

    seen = []
    original = model.generate
    model.generate = lambda *a, **k: seen.append(k) or original(*a, **k)
    harness = RecurrentLMEval(pretrained=model, tokenizer=tokenizer, num_steps=6, exit_criterion="kl", batch_size=1)
    harness.generate_until([Instance(request_type="generate_until", doc={},
                                     arguments=("a=3;a?", {"until": ["<eos>"], "max_gen_toks": 2}), idx=0)])
    assert seen and seen[0]["num_steps"] == 6 and seen[0]["exit_criterion"] == "kl"


def test_a_shipped_model_scores_on_a_task_it_solves(tmp_path):
    """The saved tokenizer itself puts bos first, so lm-eval feeds the ids the model was trained on: the demo model
    picks the composed permutation out of four (chance 0.25) as it does through the project's own evaluation."""
    permutation_choice_task(tmp_path)
    result = lm_eval_sweep("demo-latent", "rlm_perm", steps="4", out=tmp_path / "out", include_path=tmp_path)
    accuracy = next(r["value"] for r in result["rows"] if r["metric"] == "acc")
    assert accuracy >= 0.9  # 24 problems; without bos the same model scored near chance


def test_depth_sweep_over_a_local_task(model_dir, task_dir, tmp_path):
    result = lm_eval_sweep(model_dir, "rlm_toy", steps="1,2", out=tmp_path / "out", include_path=task_dir)
    accuracy = [r for r in result["rows"] if r["metric"] == "acc"]
    assert [r["steps"] for r in accuracy] == [1, 2]
    assert (tmp_path / "out" / "summary.md").is_file() and (tmp_path / "out" / "rlm_toy.png").is_file()
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["rows"]) == len(result["rows"])
