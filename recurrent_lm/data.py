"""The data path from tasks and text to batches.

- Step labels for a process reward model: a chain of thought with the step tag after each step, and the good or
  bad token as the label at each tag (encode_step_labels); the stream corrupts steps of worked solutions at a rate
  and labels them with the task's exact step checker, and mixes in labelled chains sampled from a policy
  (`rlm label-steps` files, load_step_chains).
- Task problems -> (input_ids, labels) with a loss mask: `loss_on="answer"` supervises the answer only (what a
  latent model must produce), "completion" the thinking and the answer (the chain-of-thought model), "all" every
  token; `hints=True` adds the tasks' dense intermediate targets on prompt positions.
- TaskStream: an endless stream of freshly generated batches. Batch b of rank r is a pure function of (seed, r, b),
  so ranks never see the same stream, workers split batches without overlap, and a run resumed at batch b sees
  exactly the batches it would have seen (no repeats, no skips). A curriculum widens the difficulty range.
- Text through the datasets library: local .txt / .json(l) / .parquet files or, for users with network, a hub
  dataset (streaming), tokenised and packed into fixed-length sequences without losing or repeating tokens.
"""

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .outputs import read_text
from .special_tokens import BAD_STEP, EOS, GOOD_STEP, STEP_TAG
from .tasks import Problem, Task, get_task
from .tokenization import THINK_END

IGNORE = -100


def takes_loss(labels: torch.Tensor) -> torch.Tensor:
    """Which positions' predictions take the loss: position t predicts label t + 1 (the causal shift), so t does
    where that label is not IGNORE; the last position predicts nothing."""
    predicting = torch.zeros_like(labels, dtype=torch.bool)
    predicting[:, :-1] = labels[:, 1:] != IGNORE
    return predicting
LOSS_ON = ("answer", "completion", "all")


# How a model reads task problems, saved with its tokenizer (tokenizer_config.json), so that every command that
# loads the model prompts it as it was trained: "plain" (the task's own text) or "chat" (the question as the user turn
# of the tokenizer's chat template, the answer as the assistant's turn, ended by the tokenizer's eos token)
PROMPT_FORMAT_KEY = "task_prompt_format"
PROMPT_FORMATS = ("plain", "chat")


def prompt_format(tokenizer) -> str:
    return getattr(tokenizer, "init_kwargs", {}).get(PROMPT_FORMAT_KEY, "plain")


def set_prompt_format(tokenizer, fmt: str) -> None:
    """Record how the model trained on this tokenizer reads problems (saved with the tokenizer)."""
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {fmt!r}")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format chat needs a tokenizer with a chat template (a pretrained model's); this one "
                         "has none")
    tokenizer.init_kwargs[PROMPT_FORMAT_KEY] = fmt


def prompt_text(tokenizer, problem: Problem, cot: bool = False, thinking_budget: int | None = None) -> str:
    """The problem's prompt as the tokenizer's model reads it: the task's text, or, in the chat format, the question
    framed by the chat template (system turn, user turn, the assistant's header) with the thinking delimiter (and a
    stated budget) after the header."""
    task = get_task(problem.task)
    text = task.prompt(problem, cot, thinking_budget)
    if prompt_format(tokenizer) == "plain":
        return text
    if task.answered_at_hints:
        raise ValueError(f"task {task.name!r} is answered at positions inside its prompt: it has no chat format")
    return chat_turn(tokenizer, problem.question) + text[len(problem.question):]


def completion_text(tokenizer, problem: Problem, cot: bool = False) -> str:
    """What the model writes after the prompt: the task's completion, in the chat format ended by the tokenizer's
    eos token (the assistant turn's end) instead of the tasks' EOS."""
    completion = get_task(problem.task).completion(problem, cot)
    if prompt_format(tokenizer) == "plain":
        return completion
    return completion.removesuffix(EOS) + tokenizer.eos_token


def chat_turn(tokenizer, question: str) -> str:
    """The question as the user turn of the tokenizer's chat template, then the assistant's header."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer, problem: Problem, cot: bool = False, thinking_budget: int | None = None) -> list[int]:
    """The problem's prompt as every model sees it at generation time: encoded with the tokenizer's own special
    tokens (bos first for this project's tokenizers; nothing for a tokenizer that adds none, such as GPT-2's), or,
    in the chat format, exactly the template's text (it writes its own special tokens)."""
    plain = prompt_format(tokenizer) == "plain"
    return tokenizer(prompt_text(tokenizer, problem, cot, thinking_budget), add_special_tokens=plain).input_ids


def generated_text(tokenizer, ids: Sequence[int]) -> str:
    """Generated ids as the task's parser reads them: the tokenizer's eos token (a pretrained model's, e.g.
    "<|im_end|>") written as the tasks' EOS, padding dropped."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if tokenizer.eos_token and tokenizer.eos_token != EOS:  # first: a pretrained model's pad token may be its eos
        text = text.replace(tokenizer.eos_token, EOS)
    return text.replace(tokenizer.pad_token, "") if tokenizer.pad_token else text


def encode_problem(tokenizer, task: Task, problem: Problem, cot: bool = False, loss_on: str = "answer",
                   hints: bool = False, state_thinking_length: bool = False) -> dict[str, list[int]]:
    """Token ids and labels (transformers convention, -100 = no loss) of one rendered problem.

    The prompt, the thinking and the answer are tokenised separately so their boundaries are exact.
    state_thinking_length: the chain-of-thought prompt states the thinking's own length in tokens ("[48]", what
    token-conditional control then asks for at test time)."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    completion = completion_text(tokenizer, problem, cot)
    thinking, answer = completion.split(THINK_END, 1) if cot else ("", completion)
    chat = prompt_format(tokenizer) == "chat"
    if chat and hints and problem.hints:
        raise ValueError("hints label positions inside the task's own prompt: the chat format has none")
    thinking_ids = tokenizer(thinking, add_special_tokens=False)["input_ids"] if thinking else []
    thinking_ids += tokenizer(THINK_END, add_special_tokens=False)["input_ids"] if cot else []
    stated = len(thinking_ids) - 1 if cot and state_thinking_length else None  # the delimiter is not thinking
    prompt = prompt_text(tokenizer, problem, cot, stated)
    encoded_prompt = tokenizer(prompt, return_offsets_mapping=True, return_special_tokens_mask=True,
                               add_special_tokens=not chat)
    prompt_ids = encoded_prompt["input_ids"]  # with the tokenizer's own special tokens, as prompt_ids gives
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    input_ids = prompt_ids + thinking_ids + answer_ids
    supervised = {"answer": len(answer_ids), "completion": len(thinking_ids) + len(answer_ids), "all": len(input_ids) - 1}
    labels = [IGNORE] * (len(input_ids) - supervised[loss_on]) + input_ids[len(input_ids) - supervised[loss_on]:]
    if (hints or task.answered_at_hints) and problem.hints:  # a task answered at its hints always learns them
        for index, target in hint_labels(tokenizer, encoded_prompt, problem.hints):
            labels[index] = target
    return {"input_ids": input_ids, "labels": labels}


def hint_labels(tokenizer, encoded_prompt, hints: Sequence[tuple[int, str]]) -> list[tuple[int, int]]:
    """(label index, target id) of each hint that falls on a token boundary of the prompt and has a one-token
    target: the token starting at the hint's offset gets the target as its label, so the position before it (having
    read the prompt up to the offset) predicts it. `encoded_prompt` holds offset_mapping and special_tokens_mask."""
    starts = {start: i for i, ((start, _), special) in
              enumerate(zip(encoded_prompt["offset_mapping"], encoded_prompt["special_tokens_mask"])) if not special}
    labels = []
    for offset, target in hints:
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if offset in starts and len(target_ids) == 1:
            labels.append((starts[offset], target_ids[0]))
    return labels


def round_trip(tokenizer, text: str, what: str) -> list[int]:
    """The ids of a text that a tokenizer must represent exactly (decoding them gives the text back); `what` names
    the tokenizer in the error, e.g. "the reward model's tokenizer"."""
    try:
        ids = tokenizer(text, add_special_tokens=False).input_ids
    except Exception as error:  # tokenizers raise their own exception types for unknown characters
        raise ValueError(f"{what} cannot represent {text[:60]!r}: {error}") from None
    decoded = tokenizer.decode(ids)
    if decoded != text:
        raise ValueError(f"{what} does not round-trip {text[:60]!r} -> {decoded[:60]!r}")
    return ids


def single_token(tokenizer, text: str, what: str) -> int:
    """The id of a text that must be one token of this tokenizer (a step tag, a delimiter)."""
    try:
        ids = tokenizer(text, add_special_tokens=False).input_ids
    except Exception as error:  # tokenizers raise their own exception types for unknown characters
        raise ValueError(f"the tokenizer cannot encode the {what} {text!r}: {error}") from error
    if len(ids) != 1:
        raise ValueError(f"the {what} {text!r} is not one token of this tokenizer ({len(ids)} tokens)")
    return ids[0]


def encode_step_labels(tokenizer, prompt: str, steps: Sequence[str], labels: Sequence[bool | float] | None = None,
                       step_tag: str = STEP_TAG, good: str = GOOD_STEP, bad: str = BAD_STEP) -> dict[str, list[int]]:
    """A chain of thought as a process reward model reads it: the prompt, then every step followed by the step tag;
    with `labels`, the good or bad token is the label of each tag position (predicted there, never an input), and
    nothing else is supervised. Also returns `tag_positions`, where the model's step scores are read."""
    tag = single_token(tokenizer, step_tag, "step tag")
    input_ids, positions = list(tokenizer(prompt).input_ids), []
    for step in steps:
        input_ids += tokenizer(step, add_special_tokens=False).input_ids
        positions.append(len(input_ids))
        input_ids.append(tag)
    encoded = {"input_ids": input_ids, "tag_positions": positions}
    if labels is not None:
        if len(labels) != len(steps):
            raise ValueError(f"{len(labels)} step labels for {len(steps)} steps")
        ids = {True: single_token(tokenizer, good, "good-step token"), False: single_token(tokenizer, bad, "bad-step token")}
        input_ids.append(tokenizer.eos_token_id)  # a position after the last tag, for its label
        encoded["labels"] = [IGNORE] * len(input_ids)
        for position, label in zip(positions, labels):
            encoded["labels"][position + 1] = ids[bool(label)]  # position predicts label position + 1
    return encoded


def labelled_chain(task: Task, problem: Problem, error_rate: float, rng: random.Random) -> tuple[list[str], list[bool]]:
    """The worked solution's steps, with one step corrupted (at a random place, and the chain cut after it half the
    time) with probability `error_rate`, and the task's exact label of every step."""
    steps = task.solution_steps(problem)
    if rng.random() < error_rate:
        i = rng.randrange(len(steps))
        wrong = task.corrupt_step(steps[i], rng)
        if wrong is not None:
            steps[i] = wrong
            if rng.random() < 0.5:
                steps = steps[: i + 1]
    return steps, task.step_labels(problem, steps)


def load_step_chains(path: str | Path) -> list[tuple[Problem, list[str], list[bool]]]:
    """Labelled chains from a JSONL file written by `rlm label-steps`; a malformed line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"step-chain file {path} does not exist")
    chains = []
    for number, line in enumerate(read_text(path, "step-chain file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem, steps, labels = Problem.from_dict(record["problem"]), list(record["steps"]), list(record["labels"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}:{number}: not a labelled chain: {error}") from None
        if len(steps) != len(labels):
            raise ValueError(f"{path}:{number}: {len(steps)} steps but {len(labels)} labels")
        chains.append((problem, steps, [bool(label) for label in labels]))
    return chains


def collate(examples: Sequence[dict[str, list[int]]], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of examples into a batch (right padding for training, left for generation prompts)."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:  # keys other than these (tag_positions) are left out
        n, pad = len(e["input_ids"]), width - len(e["input_ids"])
        rows = (e["input_ids"], [1] * n, e.get("labels", e["input_ids"]))
        fills = (pad_token_id, 0, IGNORE)
        for key, row, fill in zip(batch, rows, fills):
            batch[key].append(row + [fill] * pad if padding_side == "right" else [fill] * pad + row)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


@dataclass
class Curriculum:
    """Difficulty of training problems: uniform over [min_difficulty, current maximum], where the maximum grows
    linearly from min_difficulty to max_difficulty over the first `ramp_batches` batches (0: no ramp)."""

    min_difficulty: int = 1
    max_difficulty: int = 4
    ramp_batches: int = 0

    def __post_init__(self):
        if not 1 <= self.min_difficulty <= self.max_difficulty:
            raise ValueError(f"curriculum needs 1 <= min_difficulty <= max_difficulty, got {self.min_difficulty}, "
                             f"{self.max_difficulty}")
        if self.ramp_batches < 0:
            raise ValueError(f"ramp_batches must be >= 0, got {self.ramp_batches}")

    def maximum(self, batch_index: int) -> int:
        if self.ramp_batches == 0:
            return self.max_difficulty
        fraction = min(1.0, (batch_index + 1) / self.ramp_batches)
        return self.min_difficulty + round(fraction * (self.max_difficulty - self.min_difficulty))

    def sample(self, batch_index: int, rng: random.Random) -> int:
        return rng.randint(self.min_difficulty, self.maximum(batch_index))


class TaskStream(IterableDataset):
    """Endless batches of freshly generated problems (use with DataLoader(batch_size=None)).

    Batch b of rank r is generated from a random.Random seeded by (seed, r, b) alone; DataLoader worker w of W
    produces batches w, w + W, ..., which the DataLoader interleaves back into order b = 0, 1, 2, ...
    `start_batch` resumes the stream exactly where an interrupted run stopped.
    """

    def __init__(self, tasks: Sequence[str], tokenizer, batch_size: int, curriculum: Curriculum, cot: bool = False,
                 loss_on: str = "answer", hints: bool = False, seed: int = 0, rank: int = 0, start_batch: int = 0,
                 difficulty_per_batch: bool = False, step_error_rate: float | None = None,
                 step_chains: Sequence[tuple[Problem, list[str], list[bool]]] = (), step_chains_share: float = 0.5,
                 state_thinking_length: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tasks = [get_task(name) for name in tasks]
        for task in self.tasks:
            task.check_difficulty(curriculum.min_difficulty)
            task.check_difficulty(curriculum.max_difficulty)
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
        self.tokenizer, self.batch_size, self.curriculum = tokenizer, batch_size, curriculum
        self.cot, self.loss_on, self.hints = cot, loss_on, hints
        self.seed, self.rank, self.start_batch = seed, rank, start_batch
        self.difficulty_per_batch = difficulty_per_batch
        self.state_thinking_length = state_thinking_length
        self.step_error_rate = step_error_rate  # not None: step-labelled chains for a process reward model
        self.step_chains, self.step_chains_share = list(step_chains), step_chains_share if step_chains else 0.0
        if step_error_rate is not None:
            if not 0 <= step_error_rate <= 1:
                raise ValueError(f"step_error_rate must be in [0, 1], got {step_error_rate}")
            if not 0 <= self.step_chains_share <= 1:
                raise ValueError(f"step_chains_share must be in [0, 1], got {step_chains_share}")
            for task in self.tasks:
                task.require_steps()

    def example(self, task: Task, problem: Problem, rng: random.Random) -> dict[str, list[int]]:
        if self.step_error_rate is None:
            return encode_problem(self.tokenizer, task, problem, self.cot, self.loss_on, self.hints,
                                  self.state_thinking_length)
        steps, labels = labelled_chain(task, problem, self.step_error_rate, rng)
        return encode_step_labels(self.tokenizer, task.prompt(problem, cot=True), steps, labels)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch `index`. With difficulty_per_batch, all its problems share one difficulty, drawn from (seed, index)
        alone (the same on every rank, so a depth tied to it is too) and returned as batch["difficulty"]."""
        rng = random.Random(f"train/{self.seed}/{self.rank}/{index}")
        shared = self.curriculum.sample(index, random.Random(f"difficulty/{self.seed}/{index}"))
        examples = []
        for _ in range(self.batch_size):
            if self.step_error_rate is not None and rng.random() < self.step_chains_share:  # a labelled policy chain
                problem, steps, labels = rng.choice(self.step_chains)
                prompt = get_task(problem.task).prompt(problem, cot=True)
                examples.append(encode_step_labels(self.tokenizer, prompt, steps, labels))
                continue
            task = rng.choice(self.tasks)
            difficulty = shared if self.difficulty_per_batch else self.curriculum.sample(index, rng)
            problem = task.generate(difficulty, rng)
            examples.append(self.example(task, problem, rng))
        batch = collate(examples, self.tokenizer.pad_token_id)
        if self.difficulty_per_batch:
            batch["difficulty"] = torch.full((self.batch_size,), shared, dtype=torch.long)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        index = self.start_batch + worker_id
        while True:
            yield self.batch(index)
            index += workers


def heldout_problems(tasks: Sequence[str], difficulties: Sequence[int], n: int, seed: int = 1234) -> list[Problem]:
    """A fixed evaluation set: n problems per (task, difficulty), from a seed the training stream never uses."""
    problems = []
    for name in tasks:
        task = get_task(name)
        for difficulty in difficulties:
            problems += task.problems(difficulty, n, seed=seed)
    return problems


# --- text ------------------------------------------------------------------------------------------------------------

FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def pack(documents: Iterable[Sequence[int]], seq_len: int, eos_token_id: int | None = None) -> Iterator[list[int]]:
    """Concatenate tokenised documents (each followed by eos, if given) and cut the stream into blocks of
    seq_len tokens. Every token lands in exactly one block, in order; the last block may be shorter."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    buffer: list[int] = []
    for document in documents:
        buffer.extend(document)
        if eos_token_id is not None:
            buffer.append(eos_token_id)
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]
    if buffer:
        yield buffer


HUB_PREFIX = "hub:"  # a hub dataset is asked for by name, explicitly: hub:NAME


def text_source(source: str | Sequence[str]) -> tuple[str, list[Path] | str]:
    """(builder, local files) or ("hub", dataset name), checked without reading anything: a missing local file is
    an error here, never a request to the hub."""
    files = [source] if isinstance(source, (str, Path)) else list(source)
    if len(files) == 1 and str(files[0]).startswith(HUB_PREFIX):
        return "hub", str(files[0])[len(HUB_PREFIX):]
    local = [Path(f) for f in files]
    folders = [str(p) for p in local if p.is_dir()]
    if folders:
        raise IsADirectoryError(f"data files {folders} are folders; give the files in them (JSONL, text, parquet)")
    missing = [str(p) for p in local if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"data files not found: {missing} (a hub dataset is named {HUB_PREFIX}NAME)")
    builders = {FILE_BUILDERS.get(p.suffix) for p in local}
    if None in builders or len(builders) > 1:
        raise ValueError(f"data files must share one of the types {sorted(FILE_BUILDERS)}, got {files}")
    return builders.pop(), local


def load_text_dataset(source: str | Sequence[str], split: str = "train", streaming: bool = False):
    """A datasets.Dataset (or IterableDataset when streaming) from local files or, for users with network, a hub
    dataset named hub:NAME. Local files: .txt (one document per line), .json/.jsonl, .parquet."""
    import datasets  # imported when text data is loaded (it takes seconds), not with every evaluation

    builder, files = text_source(source)
    if builder == "hub":
        return datasets.load_dataset(files, split=split, streaming=streaming)  # the network is the user's choice
    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split=split, streaming=streaming)
    except Exception as error:  # datasets wraps parse errors in several exception types
        raise ValueError(f"cannot read {[str(p) for p in files]} as {builder}: {str(error).splitlines()[0]}") from None


class TextStream(IterableDataset):
    """Packed fixed-length sequences (input_ids = labels) of a text dataset, sharded over ranks and workers."""

    def __init__(self, source, tokenizer, seq_len: int, text_field: str = "text", split: str = "train",
                 streaming: bool = False, rank: int = 0, world_size: int = 1):
        self.dataset = load_text_dataset(source, split, streaming)
        columns = self.dataset.column_names
        if columns is not None and text_field not in columns:
            raise ValueError(f"the data has no field {text_field!r}; its fields are {columns}")
        self.tokenizer, self.seq_len, self.text_field = tokenizer, seq_len, text_field
        self.rank, self.world_size = rank, world_size

    def documents(self) -> Iterator[list[int]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        shard, shards = self.rank * workers + worker_id, self.world_size * workers
        for i, row in enumerate(self.dataset):
            if i % shards == shard and row[self.text_field]:
                yield self.tokenizer(row[self.text_field], add_special_tokens=False)["input_ids"]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for block in pack(self.documents(), self.seq_len, self.tokenizer.eos_token_id):
            ids = torch.tensor(block, dtype=torch.long)
            yield {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
