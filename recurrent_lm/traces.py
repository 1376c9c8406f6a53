"""Reasoning traces in s1K's shape (Muennighoff et al. 2025, arXiv 2501.19393): a question, a thinking trajectory and
an answer (the "attempt"), the data that `rlm finetune` trains any causal LM on and `rlm select-traces` selects.

- Reading: local JSON Lines files (read line by line, so that a bad row is named by file and line), parquet or
  .json files through the datasets library, or a hub dataset named hub:NAME (for users with the network; a hub
  request is never made for anything else). Field names are options; a thinking trajectory given as a list of
  strings (s1K's `thinking_trajectories`) is joined with "\\n".
- Rendering, without a chat template, is exactly the project's chain-of-thought format (Task.render(problem,
  cot=True) for the project's tasks): question + THINK_START + thinking + THINK_END + answer + eos. With one, the
  question is the user turn (add_generation_prompt=True) and THINK_START follows the template's assistant prefix.
- Encoding: the prompt, the thinking and the answer are tokenised apart (their boundaries exact, as
  recurrent_lm.data.encode_problem does); the labels supervise the thinking, the end-of-thinking delimiter, the
  answer and eos, and mask the prompt with -100.
- The thinking delimiters are added to a tokenizer that lacks them (special tokens; the model's embeddings grow
  to hold them), and must then encode to one token each.
- A pool of traces with exact answers from the project's tasks (`trace_row`: what `rlm tasks export --format
  traces` writes).
"""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .data import HUB_PREFIX, IGNORE, chat_turn, load_text_dataset, single_token, text_source
from .outputs import read_text, write_text_atomically
from .problem import Problem
from .special_tokens import THINK_END, THINK_START
from .tasks import get_task

# s1K's field names: the defaults everywhere a field is an option
QUESTION_FIELD, THINKING_FIELD, ANSWER_FIELD = "question", "thinking_trajectories", "attempt"


class TraceError(ValueError):
    """A row that is not a well-formed trace; the message starts with where it is (FILE:LINE or FILE row N)."""


@dataclass(frozen=True)
class Trace:
    question: str
    thinking: str  # the trajectory, a list of strings joined with "\n"
    answer: str
    location: str  # FILE:LINE (JSON Lines) or FILE row N (parquet, .json, a hub dataset)
    row: dict = field(default_factory=dict, compare=False)  # the row as read, every field kept


# --- reading --------------------------------------------------------------------------------------------------------


def trace_sources(sources: str | Path | Sequence[str | Path]) -> list[str]:
    """The sources as a list: local files (each checked to exist, never a hub request) or one hub:NAME."""
    sources = [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
    if not sources:
        raise ValueError("no trace files given")
    repeated = sorted({s for s in sources if sources.count(s) > 1})
    if repeated:  # its traces would count twice
        raise ValueError(f"trace files {repeated} are given twice; give each once")
    for source in sources:
        if source.startswith(HUB_PREFIX) and len(sources) > 1:
            raise ValueError(f"a hub dataset ({source}) is read alone, not beside other files")
        text_source([source])  # a missing local file fails here, by name
    return sources


def read_rows(source: str | Path) -> Iterator[tuple[str, dict | None]]:
    """(location, row) of every row of one source; a JSON Lines line that is not a JSON object gives None (blank
    lines are skipped, and counted in the line numbers)."""
    source = str(source)
    if source.startswith(HUB_PREFIX) or Path(source).suffix != ".jsonl":
        for index, row in enumerate(load_text_dataset([source])):
            yield f"{source} row {index + 1}", dict(row)
        return
    # split at newlines only, as JSON Lines does (splitlines would also split a row's raw U+2028)
    for number, line in enumerate(read_text(source, "trace file").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        yield f"{source}:{number}", row if isinstance(row, dict) else None


def field_text(row: dict, name: str, location: str, joined: bool = False) -> str:
    """A field's text: present, text (numbers are written out; with `joined`, a list of strings joined with
    "\\n") and not blank; anything else is a TraceError naming the location and the field."""
    if name not in row:
        raise TraceError(f"{location}: the trace lacks the field {name!r} (its fields: {sorted(row)})")
    value = row[name]
    if value is None:
        raise TraceError(f"{location}: the field {name!r} is empty (null)")
    if joined and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        value = "\n".join(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise TraceError(f"{location}: the field {name!r} is not text ({type(value).__name__})")
    if not value.strip():
        raise TraceError(f"{location}: the field {name!r} is empty")
    return value


def parse_trace(row: dict | None, location: str, question_field: str = QUESTION_FIELD,
                thinking_field: str = THINKING_FIELD, answer_field: str = ANSWER_FIELD) -> Trace:
    if row is None:
        raise TraceError(f"{location}: not a JSON object")
    return Trace(field_text(row, question_field, location), field_text(row, thinking_field, location, joined=True),
                 field_text(row, answer_field, location), location, row)


def load_traces(sources: str | Path | Sequence[str | Path], question_field: str = QUESTION_FIELD,
                thinking_field: str = THINKING_FIELD, answer_field: str = ANSWER_FIELD) -> list[Trace]:
    """Every trace of the sources; the first malformed row is an error naming its file, line and field, and
    sources with no rows at all are an error too."""
    sources = trace_sources(sources)
    traces = [parse_trace(row, location, question_field, thinking_field, answer_field)
              for source in sources for location, row in read_rows(source)]
    if not traces:
        raise ValueError(f"{', '.join(sources)} holds no traces")
    return traces


def save_rows(rows: Sequence[dict], path: str | Path) -> Path:
    """Rows as JSON Lines, written atomically (a temporary file beside it, then renamed)."""
    return write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# --- a pool from the project's tasks --------------------------------------------------------------------------------


def trace_row(problem: Problem) -> dict:
    """A problem of the project's tasks as a trace in s1K's shape, with its exact answer: {question,
    thinking_trajectories (one string: the steps, each followed by the task's ";"), attempt (the worked answer),
    domain (the task), difficulty, answer (the gold answer)}. Rendered without a chat template, it is exactly
    Task.render(problem, cot=True)."""
    task = get_task(problem.task)
    thinking, _, _ = task.completion(problem, cot=True).partition(THINK_END)
    return {QUESTION_FIELD: problem.question, THINKING_FIELD: [thinking], ANSWER_FIELD: problem.answer,
            "domain": problem.task, "difficulty": problem.difficulty, "answer": problem.answer}


# --- rendering and encoding -----------------------------------------------------------------------------------------


def uses_chat_template(tokenizer, chat_template: bool = True) -> bool:
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def trace_prompt(tokenizer, question: str, chat_template: bool = True) -> str:
    """What the model reads before it thinks: the question and THINK_START, or, through the tokenizer's chat
    template (where it has one and `chat_template` is true), the question as the user turn, the template's
    generation prompt, then THINK_START."""
    if uses_chat_template(tokenizer, chat_template):
        return chat_turn(tokenizer, question) + THINK_START
    return question + THINK_START


def render_trace(tokenizer, trace: Trace, chat_template: bool = True) -> str:
    """The full text a trace trains on: prompt + thinking + THINK_END + answer + the tokenizer's eos."""
    return trace_prompt(tokenizer, trace.question, chat_template) + trace.thinking + THINK_END + trace.answer + (
        tokenizer.eos_token or "")


def trace_prompt_ids(tokenizer, question: str, chat_template: bool = True) -> list[int]:
    """The prompt's ids: with the tokenizer's own special tokens (bos first for this project's tokenizers, as
    recurrent_lm.data.prompt_ids gives), or, through a chat template, exactly the template's text (it writes its
    own special tokens)."""
    templated = uses_chat_template(tokenizer, chat_template)
    return tokenizer(trace_prompt(tokenizer, question, chat_template), add_special_tokens=not templated).input_ids


def encode_trace(tokenizer, trace: Trace, chat_template: bool = True) -> dict[str, list[int]]:
    """Token ids and labels (-100 on the prompt) of one trace. For the project's tasks and tokenizers, exactly
    recurrent_lm.data.encode_problem(tokenizer, task, problem, cot=True, loss_on="completion")."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: a trace ends with eos")
    prompt = trace_prompt_ids(tokenizer, trace.question, chat_template)
    thinking = tokenizer(trace.thinking, add_special_tokens=False).input_ids
    thinking += [single_token(tokenizer, THINK_END, "thinking delimiter")]
    answer = tokenizer(trace.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    completion = thinking + answer
    return {"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}


def pack_examples(examples: Sequence[dict[str, list[int]]], length: int) -> list[dict[str, list[int]]]:
    """Encoded examples concatenated, labels and all, and cut into blocks of `length` tokens (the last one may be
    shorter). Every token lands in one block, in order; attention then spans the examples of a block (plain
    packing), each ending with its eos."""
    if length < 2:
        raise ValueError(f"a packed block needs >= 2 tokens, got {length}")
    ids = [token for e in examples for token in e["input_ids"]]
    labels = [label for e in examples for label in e["labels"]]
    return [{"input_ids": ids[i : i + length], "labels": labels[i : i + length]} for i in range(0, len(ids), length)]


# --- the thinking delimiters ----------------------------------------------------------------------------------------


def add_thinking_delimiters(tokenizer, model=None) -> list[str]:
    """Add THINK_START and THINK_END as special tokens where the tokenizer does not encode them to one token each,
    and grow the model's token embeddings (and LM head) to the tokenizer's size where they are smaller. Returns
    the delimiters added. A model whose embeddings cannot be resized, or a delimiter still not one token, is an
    error."""
    missing = []
    for delimiter in (THINK_START, THINK_END):
        try:
            single_token(tokenizer, delimiter, "thinking delimiter")
        except ValueError:
            missing.append(delimiter)
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if model is not None:
        try:
            rows = model.get_input_embeddings().weight.shape[0]
            if len(tokenizer) > rows:
                model.resize_token_embeddings(len(tokenizer))
        except (NotImplementedError, AttributeError, TypeError, ValueError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"the model's token embeddings cannot be resized to hold the thinking delimiters "
                             f"{missing} ({len(tokenizer)} tokens): {reason}") from None
    for delimiter in (THINK_START, THINK_END):
        try:
            single_token(tokenizer, delimiter, "thinking delimiter")
        except ValueError as error:
            raise ValueError(f"the tokenizer cannot hold the thinking delimiters: {error}") from None
    return missing


def thinking_length(trace: Trace, tokenizer=None) -> int:
    """The thinking trajectory's length: in the tokenizer's tokens, or characters without one."""
    if tokenizer is None:
        return len(trace.thinking)
    return len(tokenizer(trace.thinking, add_special_tokens=False).input_ids)
