"""Tokenizers and the data pipeline."""

import json

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from recurrent_lm.data import IGNORE, Curriculum, TaskStream, TextStream, collate, encode_problem, pack
from recurrent_lm.tasks import TASKS, task_tokenizer
from recurrent_lm.tokenization import SPECIAL_TOKENS, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return task_tokenizer(list(TASKS))


def tokens(tokenizer, ids):
    return [tokenizer.convert_ids_to_tokens(i) if i != IGNORE else "_" for i in ids]


# --- tokenizers ----------------------------------------------------------------------------------------------


def test_character_tokenizer_saves_as_a_fast_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.is_fast
    assert [loaded.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<bos>", "<eos>")
    text = "a=3;b=a+4;b?<think>a=3;</think>0<eos>"
    assert loaded.decode(loaded(text).input_ids) == "<bos>" + text  # the tokenizer puts bos first
    assert len(loaded("a=3;", add_special_tokens=False).input_ids) == 4  # one token per character


def test_text_outside_the_alphabet_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match=r"outside the tokenizer's alphabet: \['Z'\]"):
        tokenizer("a=Z")


def test_bpe_trainer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 300 + "<think>why</think>\n")
    bpe = train_bpe_tokenizer([corpus], vocab_size=300)
    bpe.save_pretrained(tmp_path / "bpe")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "bpe")
    text = "the cat <think>sat</think> on é"
    ids = loaded(text).input_ids
    assert loaded.decode(ids) == "<bos>" + text
    assert loaded.convert_tokens_to_ids("<think>") in ids and len(loaded) <= 300
    assert len(loaded("the cat sat on the mat", add_special_tokens=False).input_ids) < len("the cat sat on the mat") / 2
    with pytest.raises(FileNotFoundError):
        train_bpe_tokenizer([tmp_path / "missing.txt"], 300)


# --- encoding problems -----------------------------------------------------------------------------------------


def test_loss_masks(tokenizer):
    task = TASKS["chain"]
    problem = task.problems(2, 1)[0]  # "k=5;t=k+6;u=t+4;u?" -> 1
    direct = encode_problem(tokenizer, task, problem, cot=False, loss_on="answer")
    assert tokens(tokenizer, direct["input_ids"])[0] == "<bos>"
    assert "".join(t for t in tokens(tokenizer, direct["labels"]) if t != "_") == "1<eos>"
    cot = encode_problem(tokenizer, task, problem, cot=True, loss_on="completion")
    supervised = "".join(t for t in tokens(tokenizer, cot["labels"]) if t != "_")
    assert supervised == task.completion(problem, cot=True)
    answer_only = encode_problem(tokenizer, task, problem, cot=True, loss_on="answer")
    assert "".join(t for t in tokens(tokenizer, answer_only["labels"]) if t != "_") == "1<eos>"
    everything = encode_problem(tokenizer, task, problem, loss_on="all")
    assert everything["labels"][1:] == everything["input_ids"][1:]
    with pytest.raises(ValueError, match="loss_on"):
        encode_problem(tokenizer, task, problem, loss_on="thinking")


def test_hints_label_each_intermediate_value_without_showing_it(tokenizer):
    task = TASKS["chain"]
    problem = task.problems(3, 1, seed=4)[0]
    encoded = encode_problem(tokenizer, task, problem, hints=True)
    ids, labels = encoded["input_ids"], encoded["labels"]
    prompt_len = 1 + len(problem.question)
    hinted = [(i, labels[i]) for i in range(prompt_len) if labels[i] != IGNORE]
    assert [tokenizer.convert_ids_to_tokens(t) for _, t in hinted] == [t for _, t in problem.hints]
    assert all(tokenizer.convert_ids_to_tokens(ids[i]) == ";" for i, _ in hinted)  # the input there is ";"


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate([{"input_ids": [5, 6]}, {"input_ids": [8]}], pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6], [0, 8]] and left["attention_mask"].tolist() == [[1, 1], [0, 1]]


# --- streams -----------------------------------------------------------------------------------------------------


def make_stream(tokenizer, **overrides):
    settings = dict(tasks=["chain", "parity"], tokenizer=tokenizer, batch_size=4, curriculum=Curriculum(1, 6, 20), seed=3)
    return TaskStream(**{**settings, **overrides})


def test_stream_is_a_pure_function_of_seed_rank_and_index(tokenizer):
    a, b = make_stream(tokenizer), make_stream(tokenizer)
    for i in (0, 7):
        assert all(torch.equal(a.batch(i)[k], b.batch(i)[k]) for k in ("input_ids", "labels"))
    assert not torch.equal(a.batch(0)["input_ids"], a.batch(1)["input_ids"])
    other_rank = make_stream(tokenizer, rank=1)
    assert not torch.equal(a.batch(0)["input_ids"], other_rank.batch(0)["input_ids"])


def test_workers_split_the_stream_and_resume_continues_it(tokenizer):
    stream = make_stream(tokenizer)
    expected = [stream.batch(i)["input_ids"] for i in range(6)]
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    got = [batch["input_ids"] for _, batch in zip(range(6), loader)]
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    resumed = next(iter(make_stream(tokenizer, start_batch=4)))["input_ids"]
    assert torch.equal(resumed, expected[4])


def test_curriculum_widens_the_difficulty_range():
    import random

    curriculum = Curriculum(1, 9, ramp_batches=100)
    assert curriculum.maximum(0) == 1 and curriculum.maximum(49) == 5 and curriculum.maximum(500) == 9
    rng = random.Random(0)
    assert max(curriculum.sample(10, rng) for _ in range(200)) <= curriculum.maximum(10)
    assert Curriculum(2, 5).maximum(0) == 5
    with pytest.raises(ValueError, match="min_difficulty <= max_difficulty"):
        Curriculum(5, 2)


def test_stream_rejects_difficulties_a_task_lacks(tokenizer):
    with pytest.raises(ValueError, match="out of range for task 'permutation'"):
        make_stream(tokenizer, tasks=["permutation"], curriculum=Curriculum(1, 30))


# --- text ----------------------------------------------------------------------------------------------------------


def test_packing_loses_and_repeats_no_token():
    documents = [list(range(start, start + n)) for start, n in [(0, 5), (100, 1), (200, 13), (300, 7)]]
    blocks = list(pack(documents, seq_len=4, eos_token_id=-1))
    flat = [t for block in blocks for t in block]
    assert flat == [t for d in documents for t in d + [-1]]
    assert all(len(b) == 4 for b in blocks[:-1]) and 1 <= len(blocks[-1]) <= 4


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_text_stream_from_local_files(tmp_path, kind):
    lines = [f"line {i} with some words" for i in range(50)]
    path = tmp_path / f"corpus.{kind}"
    if kind == "txt":
        path.write_text("\n".join(lines) + "\n")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": lines}), path)
    corpus = tmp_path / "tok.txt"
    corpus.write_text("\n".join(lines) * 10)
    tokenizer = train_bpe_tokenizer([corpus], vocab_size=280)
    stream = TextStream(str(path), tokenizer, seq_len=16)
    blocks = list(stream)
    flat = [t for b in blocks for t in b["input_ids"].tolist()]
    expected = [t for line in lines for t in tokenizer(line, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]]
    assert flat == expected
    assert all(torch.equal(b["labels"], b["input_ids"]) for b in blocks)
    shards = [list(TextStream(str(path), tokenizer, seq_len=16, rank=r, world_size=2)) for r in (0, 1)]
    assert sum(len(b["input_ids"]) for s in shards for b in s) == len(expected)


def test_bad_data_files(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="not found"):
        TextStream(str(tmp_path / "missing.jsonl"), tokenizer, seq_len=8)
    with pytest.raises(FileNotFoundError, match=r"not found: \['my_corpus'\] \(a hub dataset is named hub:NAME\)"):
        TextStream("my_corpus", tokenizer, seq_len=8)  # a typo of a folder: a local error, never a hub request
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match="cannot read"):
        TextStream(str(bad), tokenizer, seq_len=8)
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "ok"}\n')
    with pytest.raises(ValueError, match="no field 'text'"):
        TextStream(str(other), tokenizer, seq_len=8)


def test_saved_tokenizers_put_bos_first_for_every_consumer(tmp_path):
    from transformers import AutoTokenizer

    from recurrent_lm.tokenization import BOS, character_tokenizer

    tokenizer = character_tokenizer("ab=")
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    bos = loaded.convert_tokens_to_ids(BOS)
    assert loaded("ab").input_ids == [bos, *loaded("ab", add_special_tokens=False).input_ids]
    assert loaded(["a", "b="]).input_ids[1][0] == bos


def test_prompt_ids_follow_the_tokenizers_own_rules():
    """A tokenizer without bos (GPT-2's, Qwen2's) gets none; this project's get theirs once, first."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from recurrent_lm.data import prompt_ids
    from recurrent_lm.tasks import get_task

    problem = get_task("chain").problems(2, 1, seed=5)[0]
    ours = task_tokenizer(["chain"])
    ids = prompt_ids(ours, problem)
    assert ids[0] == ours.bos_token_id and ids.count(ours.bos_token_id) == 1
    alphabet = sorted(set(get_task("chain").prompt(problem)))
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(alphabet)}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    no_bos = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert no_bos.bos_token_id is None
    assert prompt_ids(no_bos, problem) == no_bos(get_task("chain").prompt(problem)).input_ids
    assert None not in prompt_ids(no_bos, problem)


def test_one_difficulty_per_batch_is_the_same_on_every_rank():
    tokenizer = task_tokenizer(["pointer"])
    curriculum = Curriculum(1, 4)
    streams = [TaskStream(["pointer"], tokenizer, 8, curriculum, rank=rank, difficulty_per_batch=True) for rank in (0, 1)]
    seen = set()
    for index in range(12):
        batches = [stream.batch(index) for stream in streams]
        difficulty = batches[0]["difficulty"]
        assert (difficulty == difficulty[0]).all() and torch.equal(difficulty, batches[1]["difficulty"])
        assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])  # each rank its own problems
        seen.add(int(difficulty[0]))
    assert seen == {1, 2, 3, 4}
    plain = TaskStream(["pointer"], tokenizer, 8, curriculum).batch(0)
    assert "difficulty" not in plain


# --- the chat format --------------------------------------------------------------------------------------------


@pytest.fixture
def chat_tokenizer():
    """A character tokenizer with a chat template and an eos of its own ("<|end|>"), as a pretrained chat model's."""
    tokenizer = task_tokenizer(["permutation"], extra="u:a")
    tokenizer.add_special_tokens({"eos_token": "<|end|>"})
    tokenizer.chat_template = ("{% for m in messages %}u:{{ m['content'] }}{{ eos_token }}{% endfor %}"
                               "{% if add_generation_prompt %}a:{% endif %}")
    return tokenizer


def test_the_chat_format_frames_prompts_and_ends_answers_with_the_templates_eos(chat_tokenizer, tmp_path):
    from recurrent_lm.data import generated_text, prompt_format, prompt_ids, prompt_text, set_prompt_format
    from recurrent_lm.loading import load_tokenizer
    from recurrent_lm.tasks import get_task

    task = get_task("permutation")
    problem = task.problems(2, 1, seed=5)[0]
    assert prompt_format(chat_tokenizer) == "plain" and prompt_text(chat_tokenizer, problem) == problem.question
    set_prompt_format(chat_tokenizer, "chat")
    assert prompt_text(chat_tokenizer, problem) == f"u:{problem.question}<|end|>a:"
    assert prompt_text(chat_tokenizer, problem, cot=True) == f"u:{problem.question}<|end|>a:<think>"
    encoded = encode_problem(chat_tokenizer, task, problem)
    prompt = prompt_ids(chat_tokenizer, problem)
    assert chat_tokenizer.bos_token_id not in prompt  # the template writes its own special tokens
    assert encoded["input_ids"] == prompt + chat_tokenizer(problem.answer + "<|end|>", add_special_tokens=False).input_ids
    assert encoded["labels"] == [IGNORE] * len(prompt) + encoded["input_ids"][len(prompt):]
    assert encoded["input_ids"][-1] == chat_tokenizer.eos_token_id != chat_tokenizer.convert_tokens_to_ids("<eos>")
    # what a model generates reads as the task's text; the format travels with the saved tokenizer
    assert generated_text(chat_tokenizer, encoded["input_ids"][len(prompt):]) == problem.answer + "<eos>"
    assert task.parse_answer(generated_text(chat_tokenizer, encoded["input_ids"][len(prompt):])) == problem.answer
    chat_tokenizer.save_pretrained(tmp_path)
    assert prompt_format(load_tokenizer(tmp_path)) == "chat"


def test_the_chat_format_rejects_what_it_cannot_write(chat_tokenizer):
    from recurrent_lm.data import prompt_text, set_prompt_format
    from recurrent_lm.tasks import get_task

    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        set_prompt_format(task_tokenizer(["permutation"]), "chat")
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        set_prompt_format(chat_tokenizer, "chatml")
    set_prompt_format(chat_tokenizer, "chat")
    with pytest.raises(ValueError, match="answered at positions inside its prompt"):
        prompt_text(chat_tokenizer, get_task("prefix-sums").problems(4, 1)[0])
    problem = get_task("chain").problems(2, 1)[0]
    with pytest.raises(ValueError, match="the chat format has none"):
        encode_problem(chat_tokenizer, get_task("chain"), problem, hints=True)


def test_answers_are_generated_and_parsed_in_the_models_format(chat_tokenizer):
    """answer_problems prompts a chat-format model through the template and reads its eos as the end."""
    from recurrent_lm.answering import answer_problems
    from recurrent_lm.data import prompt_ids, set_prompt_format
    from recurrent_lm.tasks import get_task

    set_prompt_format(chat_tokenizer, "chat")
    problems = get_task("permutation").problems(3, 2, seed=1)
    fed = []

    class Echo(torch.nn.Module):  # writes each problem's answer then eos, and records its prompts
        device = torch.device("cpu")

        def generate(self, input_ids, attention_mask, **kwargs):
            fed.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
            answers = [chat_tokenizer(p.answer + "<|end|>", add_special_tokens=False).input_ids for p in problems]
            return type("Out", (), {"sequences": torch.cat([input_ids, torch.tensor(answers)], 1)})()

    answers = answer_problems(Echo(), chat_tokenizer, problems)
    assert fed == [prompt_ids(chat_tokenizer, p) for p in problems]
    assert [a.answer for a in answers] == [p.answer for p in problems] and all(a.score == 1.0 for a in answers)


def test_the_data_module_records_the_prompt_format_on_its_tokenizer(chat_tokenizer, tmp_path):
    from recurrent_lm.data import prompt_format
    from train.data import RecurrentDataModule

    chat_tokenizer.save_pretrained(tmp_path)
    data = RecurrentDataModule(tasks=["permutation"], tokenizer=str(tmp_path), prompt_format="chat")
    assert prompt_format(data.tokenizer) == "chat"
    assert prompt_format(RecurrentDataModule(tasks=["permutation"], tokenizer=str(tmp_path)).tokenizer) == "plain"
    (tmp_path / "text.txt").write_text("some text\n")
    with pytest.raises(ValueError, match="text_files are read as they are"):
        RecurrentDataModule(text_files=[str(tmp_path / "text.txt")], tokenizer=str(tmp_path), prompt_format="chat")
