"""`rlm finetune` (s1-style fine-tuning of any causal LM on reasoning traces), `rlm select-traces` (s1's data
selection) and the trace format between them (recurrent_lm.traces)."""

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from recurrent_lm import RecurrentConfig, RecurrentLM
from recurrent_lm.commands import tasks_export
from recurrent_lm.data import IGNORE, collate, encode_problem, single_token
from recurrent_lm.loading import load_model
from recurrent_lm.special_tokens import THINK_END, THINK_START
from recurrent_lm.tasks import TASKS, get_task, task_tokenizer
from recurrent_lm.traces import (add_thinking_delimiters, encode_trace, load_traces, pack_examples, parse_trace,
                                 render_trace, trace_row)
from recurrent_lm.train.selection import Candidate, select_traces, spread

from .test_cli import one_line_error, rlm

CHAIN = get_task("chain")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def plain_tokenizer(alphabet: str, **kwargs) -> PreTrainedTokenizerFast:
    """A character tokenizer without the thinking delimiters (and no bos of its own)."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<bos>", "<eos>", *sorted(set(alphabet))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   **kwargs)


def tiny_llama(vocab_size: int, tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def mean_loss(model, tokenizer, traces, **kwargs) -> float:
    batch = collate([encode_trace(tokenizer, t) for t in traces], tokenizer.pad_token_id)
    with torch.no_grad():
        return float(model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=batch["labels"], **kwargs).loss)


def finetune(tmp_path, model_dir, traces, *overrides):
    root = tmp_path / "run"
    result = rlm("finetune", "--config", "s1", "--model.model", str(model_dir), "--data.train_files", f"[{traces}]",
                 "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.devices", "1",
                 "--trainer.accumulate_grad_batches", "1", "--data.batch_size", "4", "--data.max_length", "64",
                 "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false", *overrides)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="module")
def chain_traces(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("traces") / "chain.jsonl"
    result = rlm("tasks", "export", "chain", str(out), "--difficulties", "1-2", "--n", "4", "--format", "traces")
    assert result.returncode == 0, result.stderr
    return out


# --- the trace format ---------------------------------------------------------------------------------------------


def test_traces_of_the_tasks_render_and_encode_as_their_chain_of_thought():
    """Without a chat template a trace is the task's CoT text exactly, and its labels mask exactly the prompt."""
    for name, task in TASKS.items():
        tokenizer = task_tokenizer([name])
        if task.answered_at_hints:  # no chain of thought to export
            with pytest.raises(ValueError, match="not by a chain of thought"):
                tasks_export(name, "unused.jsonl", format="traces")
            continue
        for problem in task.problems(3, 2, seed=5):
            row = trace_row(problem)
            assert set(row) == {"question", "thinking_trajectories", "attempt", "domain", "difficulty", "answer"}
            assert (row["domain"], row["difficulty"], row["answer"]) == (name, 3, problem.answer)
            trace = parse_trace(row, "pool.jsonl:1")
            assert render_trace(tokenizer, trace) == task.render(problem, cot=True)
            assert trace.thinking == "".join(step + ";" for step in problem.steps)
            encoded = encode_trace(tokenizer, trace)
            assert encoded == encode_problem(tokenizer, task, problem, cot=True, loss_on="completion")
            prompt = tokenizer(problem.question + THINK_START).input_ids  # bos, the question, <think>
            ids, labels = encoded["input_ids"], encoded["labels"]
            assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
            assert labels[len(prompt):] == ids[len(prompt):]  # thinking, </think>, answer, eos: all supervised
            assert tokenizer.decode(ids[len(prompt):]) == task.completion(problem, cot=True)
    # s1K's thinking_trajectories is a list of strings: joined with "\n"
    trace = parse_trace({"question": "q", "thinking_trajectories": ["one", "two"], "attempt": 3}, "x.jsonl:1")
    assert (trace.thinking, trace.answer) == ("one\ntwo", "3")


def test_chat_template_renders_the_question_as_the_user_turn():
    tokenizer = task_tokenizer(["chain"], extra=":|")
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}u:{{ m['content'] }}|{% endfor %}"
                               "{% if add_generation_prompt %}a:{% endif %}")
    problem = CHAIN.problems(2, 1, seed=3)[0]
    trace = parse_trace(trace_row(problem), "x.jsonl:1")
    templated = tokenizer.apply_chat_template([{"role": "user", "content": problem.question}], tokenize=False,
                                              add_generation_prompt=True)
    assert templated == f"<bos>u:{problem.question}|a:"
    thinking, answer = trace.thinking, problem.answer
    assert render_trace(tokenizer, trace) == templated + THINK_START + thinking + THINK_END + answer + "<eos>"
    assert render_trace(tokenizer, trace, chat_template=False) == CHAIN.render(problem, cot=True)
    encoded = encode_trace(tokenizer, trace)
    prompt = tokenizer(templated + THINK_START, add_special_tokens=False).input_ids
    assert encoded["input_ids"][: len(prompt)] == prompt and encoded["input_ids"].count(tokenizer.bos_token_id) == 1
    assert encoded["labels"] == [IGNORE] * len(prompt) + encoded["input_ids"][len(prompt):]


def test_a_model_finetuned_through_the_chat_template_is_prompted_through_it(tmp_path):
    """The trace data module records the chat format on the tokenizer it trains, so that every evaluation (budget
    forcing, sweeps) prompts the fine-tuned model exactly as its traces were written."""
    from recurrent_lm.data import prompt_format, prompt_text
    from recurrent_lm.traces import trace_prompt
    from recurrent_lm.train.finetune import TraceDataModule

    problems = CHAIN.problems(2, 3, seed=3)
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps(trace_row(p)) + "\n" for p in problems))
    for chat_template, expected in ((True, "chat"), (False, "plain")):
        tokenizer = task_tokenizer(["chain"], extra=":|")
        tokenizer.chat_template = "{% for m in messages %}u:{{ m['content'] }}|{% endfor %}a:"
        TraceDataModule(str(tmp_path / "traces.jsonl"), chat_template=chat_template).use_tokenizer(tokenizer)
        assert prompt_format(tokenizer) == expected
        assert [prompt_text(tokenizer, p, cot=True) for p in problems] == [
            trace_prompt(tokenizer, p.question, chat_template) for p in problems]
    plain = task_tokenizer(["chain"])  # no template: plain, whatever the option says
    TraceDataModule(str(tmp_path / "traces.jsonl")).use_tokenizer(plain)
    assert prompt_format(plain) == "plain"


def test_delimiters_are_added_where_the_tokenizer_lacks_them():
    tokenizer = plain_tokenizer(CHAIN.alphabet)
    model = tiny_llama(len(tokenizer), tokenizer)
    with pytest.raises(ValueError):
        single_token(tokenizer, THINK_START, "delimiter")
    assert add_thinking_delimiters(tokenizer, model) == [THINK_START, THINK_END]
    start, end = single_token(tokenizer, THINK_START, "d"), single_token(tokenizer, THINK_END, "d")
    assert {start, end} == {len(tokenizer) - 2, len(tokenizer) - 1}
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == model.config.vocab_size
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert add_thinking_delimiters(tokenizer, model) == []  # idempotent
    # a tokenizer that has them (the project's) is left as it is, and so is a model with room to spare
    ours = task_tokenizer(["chain"])
    roomy = tiny_llama(len(ours) + 8, ours)
    assert add_thinking_delimiters(ours, roomy) == [] and roomy.config.vocab_size == len(ours) + 8
    # packing keeps every token and label, in order
    examples = [encode_trace(ours, parse_trace(trace_row(p), "x")) for p in CHAIN.problems(2, 3, seed=1)]
    blocks = pack_examples(examples, 16)
    assert [t for b in blocks for t in b["input_ids"]] == [t for e in examples for t in e["input_ids"]]
    assert [t for b in blocks for t in b["labels"]] == [t for e in examples for t in e["labels"]]
    assert all(len(b["input_ids"]) == 16 for b in blocks[:-1])


# --- fine-tuning ----------------------------------------------------------------------------------------------------


def test_finetune_a_llama_lowers_the_loss_and_exports_a_cot_baseline(tmp_path, chain_traces):
    from recurrent_lm.eval.budget_forcing import budget_forced_generate

    tokenizer = task_tokenizer(["chain"])
    source = save(tiny_llama(len(tokenizer), tokenizer), tokenizer, tmp_path / "llama")
    traces = load_traces(chain_traces)
    before = mean_loss(AutoModelForCausalLM.from_pretrained(source), tokenizer, traces)
    root = finetune(tmp_path, source, chain_traces, "--trainer.max_epochs", "12", "--model.learning_rate", "1e-2",
                    "--data.pack", "true")
    model, exported = AutoModelForCausalLM.from_pretrained(root / "model"), AutoTokenizer.from_pretrained(root / "model")
    after = mean_loss(model, exported, traces)
    assert after < 0.7 * before, (before, after)
    assert exported.get_vocab() == tokenizer.get_vocab()
    assert (root / "checkpoints" / "last.ckpt").is_file()
    # budget forcing (what `rlm compare --cot` runs) takes the exported model as it is
    result = budget_forced_generate(model, exported, [CHAIN.prompt(CHAIN.problems(1, 1)[0], cot=True)],
                                    max_thinking=4, max_answer_tokens=2)[0]
    assert len(result.thinking_ids) <= 4


def test_finetune_a_recurrent_lm_adds_the_delimiters_it_lacks(tmp_path, chain_traces):
    tokenizer = plain_tokenizer(CHAIN.alphabet)
    torch.manual_seed(0)
    source = save(RecurrentLM(RecurrentConfig.preset("debug", vocab_size=len(tokenizer))), tokenizer, tmp_path / "rlm")
    root = finetune(tmp_path, source, chain_traces, "--trainer.max_epochs", "6", "--model.learning_rate", "3e-3",
                    "--model.num_steps", "2")
    exported = AutoTokenizer.from_pretrained(root / "model")
    model = load_model(root / "model")
    assert len(exported) == len(tokenizer) + 2 == model.config.vocab_size  # the embeddings grew with the tokenizer
    assert single_token(exported, THINK_START, "d") != single_token(exported, THINK_END, "d")
    traces = load_traces(chain_traces)
    start = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    original = RecurrentLM.from_pretrained(source)
    add_thinking_delimiters(start, original)
    depth = dict(num_steps=2, init_scale=0.0)
    before, after = mean_loss(original, start, traces, **depth), mean_loss(model, exported, traces, **depth)
    assert after < 0.8 * before, (before, after)


def test_the_s1_recipe_is_s1s_hyperparameters():
    result = rlm("finetune", "--config", "s1", "--print_config")
    assert result.returncode == 0, result.stderr
    for line in ("max_epochs: 5", "learning_rate: 1.0e-05", "weight_decay: 0.0001", "warmup_ratio: 0.05",
                 "precision: bf16-mixed", "accumulate_grad_batches: 16", "batch_size: 1", "- hub:simplescaling/s1K",
                 "thinking_field: thinking_trajectories", "answer_field: attempt"):
        assert line in result.stdout, line


# --- selection ------------------------------------------------------------------------------------------------------


def row(question, thinking_length, domain, attempt="1", answer="1", **extra):
    return {"question": question, "thinking_trajectories": ["a" * thinking_length], "attempt": attempt,
            "domain": domain, "answer": answer, **extra}


def test_select_traces_keeps_what_the_rules_say(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", [
        row("a1", 10, "chain"), row("a2", 30, "chain"), row("a3", 20, "chain"),
        row("b1", 5, "permutation"), row("b2", 50, "permutation"),
        {"question": "bad1", "thinking_trajectories": ["x"], "domain": "chain"},   # no attempt
        row("", 40, "chain"),                                                      # empty question
        {**row("bad3", 40, "parity"), "thinking_trajectories": {"not": "text"}},   # thinking not text
        "not json",
        row("c1", 7, "parity"),
    ])
    out = tmp_path / "selected.jsonl"
    result = rlm("select-traces", "--pool", str(pool), "--out", str(out), "--n", "4")
    assert result.returncode == 0, result.stderr
    # quality drops the 4 malformed rows; round-robin over the domains in order of appearance, longest first
    assert [r["question"] for r in map(json.loads, out.read_text().splitlines())] == ["a2", "b2", "c1", "a3"]
    assert "malformed (a field missing, empty or not text): 4 dropped (first: " in result.stdout
    assert f"{pool}:6: the trace lacks the field 'attempt'" in result.stdout
    assert "diversity: 4 kept over 3 domains (round-robin), 2 dropped" in result.stdout
    assert json.loads(out.read_text().splitlines()[0]) == row("a2", 30, "chain")  # rows kept as they were
    # one domain: simply the longest; s1's uniform-domain sampling is a pure function of its seed
    assert select_traces(str(pool), out, n=2, domain_field=None, overwrite=True)["kept"] == 2
    assert [json.loads(r)["question"] for r in out.read_text().splitlines()] == ["b2", "a2"]
    picks = []
    for _ in range(2):
        select_traces(str(pool), out, n=5, diversity="uniform-domain", seed=3, overwrite=True)
        picks.append([json.loads(r)["question"] for r in out.read_text().splitlines()])
    assert picks[0] == picks[1] and len(set(picks[0])) == 5 and set(picks[0]) <= {"a1", "a2", "a3", "b1", "b2", "c1"}
    # s1's rule: a domain uniformly at random, then a trace of it with weight 2^-rank (longest first)
    candidates = [Candidate(parse_trace(r, "x"), r["domain"], None, i) for i, r in enumerate(
        [row("a1", 10, "chain"), row("a2", 30, "chain"), row("a3", 20, "chain"), row("b1", 5, "permutation"),
         row("c1", 7, "parity")])]
    for c in candidates:
        c.length = len(c.trace.thinking)
    firsts = [spread(candidates, 1, "uniform-domain", random.Random(seed))[0].trace.question for seed in range(3000)]
    share = {q: firsts.count(q) / len(firsts) for q in ("a2", "a3", "a1", "b1", "c1")}
    expected = {"a2": 1 / 3 * 4 / 7, "a3": 1 / 3 * 2 / 7, "a1": 1 / 3 * 1 / 7, "b1": 1 / 3, "c1": 1 / 3}
    assert all(abs(share[q] - expected[q]) < 0.03 for q in expected), share
    # fewer traces than asked: all that pass, said so
    result = rlm("select-traces", "--pool", str(pool), "--out", str(out), "--n", "100", "--overwrite")
    assert "only 6 traces pass the rules" in result.stdout and len(out.read_text().splitlines()) == 6


def test_select_traces_with_a_task_checks_answers(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", [
        row("a=1;a?", 3, "chain", attempt="1", answer="1", difficulty=1),
        row("a=2;a?", 3, "chain", attempt="two!", answer="2", difficulty=1),  # "!" is no chain answer: unparseable
        row("a=3;a?", 3, "chain", attempt="4", answer="3", difficulty=1),     # parses, but wrong
    ])
    out = tmp_path / "selected.jsonl"
    kept = select_traces(str(pool), out, n=10, task="chain")
    assert kept["kept"] == 2 and kept["dropped"] == {"unparseable": 1}
    kept = select_traces(str(pool), out, n=10, task="chain", require_correct=True, overwrite=True)
    assert kept["kept"] == 1 and kept["dropped"] == {"unparseable": 1, "wrong": 1}


def two_solved_of_four(tmp_path) -> tuple[Path, list[dict]]:
    """A pool of four 1-permutation traces, of which the last two carry a gold answer the model will not give
    (still a permutation, so it parses)."""
    rows = [trace_row(p) for p in get_task("permutation").problems(1, 4, seed=4242)]
    for r in rows[2:]:
        r["answer"] = r["answer"][1:] + r["answer"][0]
    return write_jsonl(tmp_path / "pool.jsonl", rows), rows


def test_select_traces_keeps_the_problems_the_model_fails(tmp_path):
    """Difficulty with a model: the shipped demo-cot solves 1-permutation problems within 16 thinking tokens, so
    the traces whose gold answer is its right answer are dropped and those with a changed gold answer kept."""
    pool, rows = two_solved_of_four(tmp_path)
    out = tmp_path / "hard.jsonl"
    for checked in ({"task": "permutation"}, {}):
        kept = select_traces(str(pool), out, n=10, model=Path("demo-cot"), budget=16, overwrite=True, **checked)
        assert kept["dropped"].get("solved") == 2, kept
        assert [json.loads(r)["question"] for r in out.read_text().splitlines()] == [r["question"] for r in rows[2:]]


def test_select_traces_reads_the_answers_of_a_model_with_its_own_eos(tmp_path):
    """A pretrained model ends its answers with an eos of its own (SmolLM2's <|im_end|>, not the tasks' <eos>):
    selection must still cut each answer there. demo-cot with its eos token renamed answers as before."""
    import shutil

    from recurrent_lm.recipes import resolve_model_dir

    model = shutil.copytree(resolve_model_dir("demo-cot"), tmp_path / "im-end")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_text((model / name).read_text().replace("<eos>", "<|im_end|>"))
    assert AutoTokenizer.from_pretrained(model).eos_token == "<|im_end|>"
    pool, _ = two_solved_of_four(tmp_path)
    for checked in ({"task": "permutation"}, {}):
        kept = select_traces(str(pool), tmp_path / "hard.jsonl", n=10, model=model, budget=16, overwrite=True,
                             **checked)
        assert kept["dropped"].get("solved") == 2, kept


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_is_one_line(tmp_path, chain_traces):
    tokenizer = task_tokenizer(["chain"])
    llama = save(tiny_llama(len(tokenizer), tokenizer), tokenizer, tmp_path / "llama")
    base = ["finetune", "--config", "s1", "--model.model", str(llama), "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(tmp_path / "run")]
    # a trace missing a field: its file, line and field
    missing = write_jsonl(tmp_path / "missing.jsonl", [row("a", 3, "chain"), "", {"question": "b",
                                                                                    "thinking_trajectories": ["x"]}])
    one_line_error(rlm(*base, "--data.train_files", f"[{missing}]"),
                   f"rlm finetune: error: {missing}:3: the trace lacks the field 'attempt'")
    one_line_error(rlm(*base, "--data.train_files", f"[{missing}]", "--data.answer_field", "nope"),
                   f"{missing}:1: the trace lacks the field 'nope'")
    blank = write_jsonl(tmp_path / "blank.jsonl", [row("a", 3, "chain"), row("b", 3, "chain", attempt=" ")])
    one_line_error(rlm(*base, "--data.train_files", f"[{blank}]"), f"{blank}:2: the field 'attempt' is empty")
    one_line_error(rlm(*base, "--model.model", str(tmp_path / "nope"), "--data.train_files", f"[{chain_traces}]"),
                   "nope is not a model directory")
    one_line_error(rlm(*base, "--data.train_files", f"[{chain_traces}]", "--model.num_steps", "2"),
                   "model.num_steps sets a RecurrentLM's depth; ", "holds a 'llama' model")
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    one_line_error(rlm(*base, "--data.train_files", f"[{empty}]"), f"{empty} holds no traces")
    one_line_error(rlm(*base, "--data.train_files", "[typo.jsonl]"), "data files not found: ['typo.jsonl']")
    # a tokenizer whose vocabulary cannot hold the delimiters: still not one token after adding them
    splitting = plain_tokenizer(CHAIN.alphabet, split_special_tokens=True)
    model = save(tiny_llama(len(splitting), splitting), splitting, tmp_path / "splitting")
    one_line_error(rlm(*base, "--model.model", str(model), "--data.train_files", f"[{chain_traces}]"),
                   "the tokenizer cannot hold the thinking delimiters: ", "'<think>'")
    # ... or a model whose embeddings cannot grow
    lacking = plain_tokenizer(CHAIN.alphabet)
    fixed = tiny_llama(len(lacking), lacking)

    def refuse(*args, **kwargs):
        raise NotImplementedError("this model's embeddings are fixed")

    fixed.resize_token_embeddings = refuse
    with pytest.raises(ValueError, match=r"the model's token embeddings cannot be resized to hold the thinking "
                                         r"delimiters \['<think>', '</think>'\] .*fixed"):
        add_thinking_delimiters(lacking, fixed)
    # selection: an empty pool, N < 1, a gold answer the task cannot read
    select = ["select-traces", "--out", str(tmp_path / "out.jsonl")]
    one_line_error(rlm(*select, "--pool", str(empty)), f"rlm select-traces: error: the pool {empty} holds no traces")
    one_line_error(rlm(*select, "--pool", str(chain_traces), "--n", "0"), "--n must be >= 1, got 0")
    bad_gold = write_jsonl(tmp_path / "gold.jsonl", [row("a=1;a?", 3, "chain"), row("b=1;b?", 3, "chain", answer="1!")])
    one_line_error(rlm(*select, "--pool", str(bad_gold), "--task", "chain"),
                   f"{bad_gold}:2: the gold answer '1!' (field 'answer') does not parse as a 'chain' answer")
    one_line_error(rlm(*select, "--pool", str(chain_traces), "--model", str(llama)), "--model needs a thinking budget")
    assert not (tmp_path / "out.jsonl").exists()
