"""Reasoning tasks: determinism, rendering and parsing, scoring, JSONL, the reasoning-gym adapter."""

import json

import pytest

from recurrent_lm.tasks import TASKS, Problem, get_task, load_jsonl, parse_int_list, save_jsonl

# The first problem of each task at difficulty 3, seed 0: generation must give exactly these on every machine.
GOLDEN = {
    "chain": "m=1;n=m+1;o=n-5;z=o+6;z?",
    "permutation": "01234.42103.24031?",
    "parity": "101?",
    "pointer": "ajbmcdddecfcgohhiijckelimnnnohpb?k",
    "prefix-sums": "111?",
    "addition": "9+413=",
    "addition-slots": "609+6=____?",
    "addition-columns": "88_23_48_00_?",
    "copy": "eha?",
}


@pytest.mark.parametrize("name", TASKS)
def test_same_seed_same_problems_everywhere(name):
    task = TASKS[name]
    assert task.problems(3, 1, seed=0)[0].question == GOLDEN[name]
    assert task.problems(3, 20, seed=5) == task.problems(3, 20, seed=5)
    assert task.problems(3, 20, seed=5) != task.problems(3, 20, seed=6)


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("cot", [False, True])
def test_gold_rendering_parses_back_to_the_answer(name, cot):
    task = TASKS[name]
    for difficulty in (task.min_difficulty, 2, 5, task.max_difficulty):
        for problem in task.problems(difficulty, 10, seed=difficulty):
            assert problem.difficulty == difficulty
            if task.answered_at_hints:  # no text to parse: the answer is read at the hints (test_easy_to_hard.py)
                assert "".join(target for _, target in problem.hints) == problem.answer
                with pytest.raises(ValueError, match="no chain of thought"):
                    task.render(problem, cot=True)
                assert task.render(problem) == problem.question + "<eos>"
                continue
            assert set(task.render(problem, cot).replace("<think>", "").replace("</think>", "")
                       .replace("<eos>", "")) <= set(task.alphabet)
            completion = task.completion(problem, cot)
            assert task.parse_answer(completion, cot) == problem.answer
            assert task.score(task.parse_answer(completion, cot), problem) == 1.0


def test_chain_values_and_chain_of_thought_are_right():
    for problem in TASKS["chain"].problems(6, 50, seed=1):
        values = {}
        for statement in problem.question.rstrip("?").split(";")[:-1]:
            name, expression = statement.split("=")
            for variable, value in values.items():
                expression = expression.replace(variable, str(value))
            values[name] = eval(expression) % 7  # noqa: S307 - our own generated arithmetic
        query = problem.question.split(";")[-1].rstrip("?")
        assert problem.answer == str(values[query])
        assert [s.rsplit("=", 1)[1] for s in problem.steps] == [str(v) for v in values.values()]
        assert [target for _, target in problem.hints] == [str(v) for v in values.values()]
        assert all(problem.question[offset] == ";" for offset, _ in problem.hints)


def test_hand_written_scoring_cases():
    chain, perm, parity = TASKS["chain"], TASKS["permutation"], TASKS["parity"]
    p = Problem("chain", 1, "a=3;b=a+4;b?", "0")
    assert chain.score(chain.parse_answer("0<eos>"), p) == 1.0
    assert chain.score(chain.parse_answer("7<eos>"), p) == 0.0  # 3 + 4 = 7 = 0 mod 7
    assert chain.score(chain.parse_answer("<eos>"), p) == 0.0
    assert chain.parse_answer("a=3;b=3+4=0;", cot=True) is None  # the thinking never ended: no answer
    assert chain.parse_answer("a=3;</think>0<eos>junk", cot=True) == "0"
    # apply 10234 (swap 0 and 1) then 02134 (swap 1 and 2): 0 -> 1 -> 2, 1 -> 0 -> 0, 2 -> 2 -> 1
    (composed,) = [pr for pr in [perm._generate(2, __import__("random").Random(0))]]
    assert perm.score("20134", Problem("permutation", 2, "10234.02134?", "20134")) == 1.0
    assert len(composed.answer) == 5 and sorted(composed.answer) == list("01234")
    assert parity.score("1", Problem("parity", 3, "111?", "1")) == 1.0
    assert parity.score("0", Problem("parity", 3, "111?", "1")) == 0.0


def test_permutation_composition_by_hand():
    task = TASKS["permutation"]
    for problem in task.problems(4, 30, seed=3):
        state, steps = list(range(5)), []
        for word in problem.question.rstrip("?").split("."):
            state = [int(word[s]) for s in state]
            steps.append(word + ">" + "".join(map(str, state)))  # the CoT restates each permutation
        assert problem.answer == "".join(map(str, state))
        assert problem.steps == tuple(steps)


def test_bad_task_and_difficulty():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match=r"difficulty 0 is out of range for task 'chain': 1..24"):
        TASKS["chain"].problems(0, 1)
    with pytest.raises(ValueError, match="out of range"):
        TASKS["permutation"].problems(17, 1)


def test_jsonl_round_trip_and_errors(tmp_path):
    problems = [p for name in TASKS for p in TASKS[name].problems(2, 3)]
    path = save_jsonl(problems, tmp_path / "set.jsonl")
    assert load_jsonl(path) == problems
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(problems[0].to_json() + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_jsonl(bad)
    bad.write_text(json.dumps({"task": "chain", "question": "a?"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a problem: problem lacks fields \['answer', 'difficulty'\]"):
        load_jsonl(bad)


def test_parse_int_list():
    assert parse_int_list("1,2,4-6") == [1, 2, 4, 5, 6]
    assert parse_int_list("8") == [8]


def test_reasoning_gym_adapter_scores_with_its_own_scorer():
    pytest.importorskip("reasoning_gym")
    task = get_task("reasoning-gym:chain_sum")
    problems = task.problems(1, 4, seed=1)
    assert problems == task.problems(1, 4, seed=1)
    for problem in problems:
        assert task.score(problem.answer, problem) == 1.0
        assert task.score("not a number", problem) == 0.0
        assert task.score(None, problem) == 0.0
    assert Problem.from_dict(json.loads(problems[0].to_json())) == problems[0]
    with pytest.raises(ValueError, match="no dataset"):
        get_task("reasoning-gym:no_such_dataset").problems(1, 1)


def test_cli_lists_and_samples(capsys):
    from recurrent_lm.cli import main

    main(["tasks", "list"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in TASKS) and "1..24" in listing
    columns = {line.index(" 1..") for line in listing.splitlines()[1:] if " 1.." in line}
    assert len(columns) == 1  # every difficulty range in one column, whatever the longest name
    main(["tasks", "sample", "chain", "--difficulty", "3", "--n", "2", "--cot"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == "m=1;n=m+1;o=n-5;z=o+6;z?<think> | m=1;n=1+1=2;o=2-5=4;z=4+6=3;</think>3<eos>"


def test_pointer_problems_keep_their_length_and_end_at_a_self_loop():
    """Difficulty changes only the number of hops: every problem has the same length, its answer is the node
    reached from the start after exactly k hops, and that node points to itself."""
    task = TASKS["pointer"]
    lengths = set()
    for k in range(task.min_difficulty, task.max_difficulty + 1):
        for problem in task.problems(k, 20, seed=3):
            table, start = problem.question.split("?")
            target = dict(zip(table[0::2], table[1::2]))
            assert sorted(target) == list(task.nodes)  # every node once, in alphabetical order
            node, path = start, []
            for _ in range(k):
                node = target[node]
                path.append(node)
            assert node == problem.answer and target[node] == node and list(problem.steps) == path
            assert all(target[n] != n for n in [start, *path[:-1]])  # no fixed point before the k-th hop
            loops = [n for n in task.nodes if target[n] == n]
            assert len(loops) == 1 + task.decoys(k) >= 2  # guessing a fixed point is right 1/2 at best
            pointed = [sum(target[m] == n and m != n for m in task.nodes) for n in loops]
            assert pointed == [1] * len(loops)  # every self-loop has exactly one pointer from another node
            lengths.add(len(problem.question))
    assert len(lengths) == 1


def test_no_rule_on_the_self_loops_alone_beats_chance_on_pointer_problems():
    """The shortcut "answer the self-loop most pointed to" (1.00 at k = 12 on the earlier generator, where the
    decoys had no pointers) scores at chance at every k: every self-loop is pointed to exactly once, so it can only
    guess among them."""
    import random

    task, rng = TASKS["pointer"], random.Random(0)
    for k in range(task.min_difficulty, task.max_difficulty + 1):
        problems = task.problems(k, 400, seed=11)
        right = 0
        for problem in problems:
            table = problem.question.split("?")[0]
            target = dict(zip(table[0::2], table[1::2]))
            loops = [n for n in task.nodes if target[n] == n]
            pointed = {n: sum(target[m] == n for m in task.nodes if m != n) for n in loops}
            most = max(pointed.values())
            right += rng.choice([n for n in loops if pointed[n] == most]) == problem.answer
        chance = 1 / (1 + task.decoys(k))
        assert abs(right / len(problems) - chance) < 0.08, (k, right / len(problems), chance)
