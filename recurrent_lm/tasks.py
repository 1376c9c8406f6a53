"""Reasoning tasks: one interface for generating, rendering, parsing and scoring problems.

Both the latent (recurrent-depth) model and the chain-of-thought baseline learn and are judged on the same
problems, rendered two ways:

    direct:  prompt = "a=3;b=a+4;c=b*2;c?"            completion = "0<eos>"
    cot:     prompt = "a=3;b=a+4;c=b*2;c?<think>"     completion = "a=3;b=3+4=0;c=0*2=0;</think>0<eos>"

Difficulty is the number of sequential reasoning steps (hops, permutations, bits), so problems harder than any
seen in training test depth extrapolation. Problems are generated from a seed with Python's own `random.Random`
(identical on every machine and Python version for these calls), and export to / import from JSONL.

Dense supervision: a problem may carry `hints`, (offset, target) pairs inside the prompt: "having read the
prompt up to this offset, the model should predict `target`" (e.g. the value of each variable right after its
statement). The data pipeline turns them into extra labels on prompt positions (the label differs from the next
input token), so one sequence supervises every intermediate result without writing it into the input.

The tasks' character tokenizer (`task_tokenizer`) sits beside the registry: it covers exactly their alphabets.
"""

import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from .outputs import read_text, write_text_atomically
from .problem import Problem, Task
from .reasoning_gym import ReasoningGymTask
from .tokenization import RecurrentCharacterTokenizer, character_tokenizer


# --- 1. variable tracking: arithmetic chains modulo a small prime -------------------------------------------------


class ChainTask(Task):
    """a=3;b=a+4;c=b*2;c?  Each statement applies one operation (+, -, *) modulo 7 to the previous variable;
    difficulty = number of operations (hops). The chain of thought writes every intermediate value."""

    name = "chain"
    max_difficulty = 24
    modulus = 7
    letters = "abcdefghijklmnopqrstuvwxyz"
    alphabet = letters + "0123456789=+-*;?"
    description = "arithmetic chain modulo 7: a=3;b=a+4;c=b*2;c? (difficulty = hops)"

    def _generate(self, difficulty: int, rng: random.Random) -> Problem:
        names = rng.sample(self.letters, difficulty + 1)
        value = rng.randrange(self.modulus)
        statements, steps, values = [f"{names[0]}={value}"], [f"{names[0]}={value}"], [value]
        for previous, name in zip(names, names[1:]):
            op, operand = rng.choice("+-*"), rng.randrange(1, self.modulus)
            new = {"+": value + operand, "-": value - operand, "*": value * operand}[op] % self.modulus
            statements.append(f"{name}={previous}{op}{operand}")
            steps.append(f"{name}={value}{op}{operand}={new}")
            value = new
            values.append(value)
        question, hints = "", []
        for statement, v in zip(statements, values):
            question += statement
            hints.append((len(question), str(v)))  # right after each statement: its variable's value
            question += ";"
        question += f"{names[-1]}?"
        return Problem(self.name, difficulty, question, str(value), tuple(steps), tuple(hints))


# --- 2. permutation composition: the S5 word problem --------------------------------------------------------------


class PermutationTask(Task):
    """20314.13024.41302?  Compose k permutations of 0..4 (each as its images of 0..4, applied left to right) and
    report the result; difficulty = k. The chain of thought restates each permutation and writes the running
    composition after it ("42013>21430;"), as a worked solution shows its operands. Tracking the state
    of S5 is not solvable by a fixed-depth transformer for long words (Merrill & Sabharwal): depth must grow with k."""

    name = "permutation"
    max_difficulty = 16
    alphabet = "01234.;?>"
    description = "S5 word problem: compose k permutations of 5 elements (difficulty = k)"

    def distinct_problems(self, difficulty: int) -> int:
        return 120**difficulty  # any k permutations of 5 elements

    def _generate(self, difficulty: int, rng: random.Random) -> Problem:
        state = list(range(5))
        words, steps, hints, question = [], [], [], ""
        for i in range(difficulty):
            perm = rng.sample(range(5), 5)
            state = [perm[s] for s in state]  # apply perm after the running composition
            words.append("".join(map(str, perm)))
            steps.append(words[-1] + ">" + "".join(map(str, state)))
        question = ".".join(words) + "?"
        return Problem(self.name, difficulty, question, "".join(map(str, state)), tuple(steps), tuple(hints))


# --- 3. prefix parity --------------------------------------------------------------------------------------------


class ParityTask(Task):
    """10110?  The parity of k bits; difficulty = k. The chain of thought writes the running parity; the hints
    supervise the running parity after every bit."""

    name = "parity"
    max_difficulty = 64
    alphabet = "01;?"
    description = "parity of k bits (difficulty = k)"

    def distinct_problems(self, difficulty: int) -> int:
        return 2**difficulty

    def _generate(self, difficulty: int, rng: random.Random) -> Problem:
        bits = [rng.randrange(2) for _ in range(difficulty)]
        running, steps, hints = 0, [], []
        for i, bit in enumerate(bits):
            running ^= bit
            steps.append(str(running))
            hints.append((i + 1, str(running)))
        return Problem(self.name, difficulty, "".join(map(str, bits)) + "?", str(running), tuple(steps), tuple(hints))


# --- 4. pointer chasing to a fixed point: difficulty without length -------------------------------------------


class PointerTask(Task):
    """acbkcc...pe?b  A table of 16 nodes a..p, each written with the node it points to (in alphabetical order, so
    every problem has the same length and layout), then a start node. Following the pointers from the start reaches
    a node that points to itself after k hops; that node is the answer, and difficulty = k. The input's length and
    format never change with k: only the number of lookups does, which separates thinking longer from length
    generalisation, and the self-loop makes extra lookups harmless (the answer is a fixed point). The chain of
    thought writes the node after each hop ("c;k;e;").

    Decoys: besides the answer, up to three other nodes point to themselves (three for k <= 9, two for k = 10 or
    11, one for k = 12: the start's chain takes k + 1 of the 16 nodes), and every self-loop, the answer included,
    is pointed to by exactly one other node. So no rule that looks at the self-loops alone (which one is pointed
    to, or most often) beats a guess among them: 1/4, 1/3 or 1/2 at those k. The other nodes hang off the
    start's chain or off the decoys' pointers, never off a self-loop."""

    name = "pointer"
    nodes = "abcdefghijklmnop"
    max_difficulty = len(nodes) - 4  # the start's chain of k + 1 nodes, a decoy and its pointer, one node to spare
    alphabet = nodes + "?;"
    description = "pointer chasing in a fixed 16-node table to a self-loop (difficulty = hops)"

    @classmethod
    def decoys(cls, difficulty: int) -> int:
        """Self-loops besides the answer: each takes two nodes (itself and the one node that points to it)."""
        return min(3, (len(cls.nodes) - difficulty - 1) // 2)

    def _generate(self, difficulty: int, rng: random.Random) -> Problem:
        order = rng.sample(self.nodes, len(self.nodes))
        chain, rest = order[: difficulty + 1], order[difficulty + 1 :]
        target = {a: b for a, b in zip(chain, chain[1:])}
        target[chain[-1]] = chain[-1]
        decoys = self.decoys(difficulty)
        for decoy, feeder in zip(rest[:decoys], rest[decoys : 2 * decoys]):
            target[decoy], target[feeder] = decoy, decoy
        placed = chain[:-1] + rest[decoys : 2 * decoys]  # nodes that are no self-loop
        for node in rest[2 * decoys :]:  # hang off those: no cycle but the self-loops, no self-loop gains a pointer
            target[node] = rng.choice(placed)
            placed.append(node)
        table = "".join(node + target[node] for node in self.nodes)
        return Problem(self.name, difficulty, f"{table}?{chain[0]}", chain[-1], tuple(chain[1:]))


# --- 5. the looped-model literature's benchmarks: difficulty is length ----------------------------------------------


class PrefixSumsTask(Task):
    """10110?  n random bits; the answer is the running parity after every bit ("11011"), the prefix-sums task of
    Schwarzschild et al. 2021 and Bansal et al. 2022 (arXiv 2106.04537, 2202.05826; difficulty = n). The model
    writes no answer text: it answers at every bit's position at once (`answered_at_hints`: the hint after bit i is
    the parity through bit i, read from the logits there in one forward pass), as their networks do, and a problem
    is right only when every position is (exact-sequence accuracy)."""

    name = "prefix-sums"
    max_difficulty = 1024
    alphabet = "01?"
    description = "running parity of n bits, answered at every position (difficulty = n bits)"
    step_separator = None
    answered_at_hints = True

    def distinct_problems(self, difficulty: int) -> int:
        return 2**difficulty

    def _generate(self, difficulty: int, rng: random.Random) -> Problem:
        bits = [rng.randrange(2) for _ in range(difficulty)]
        running, parities = 0, []
        for bit in bits:
            running ^= bit
            parities.append(str(running))
        hints = tuple((i + 1, parity) for i, parity in enumerate(parities))
        return Problem(self.name, difficulty, "".join(map(str, bits)) + "?", "".join(parities), (), hints)


class AdditionTask(Task):
    """4021+93=  Add two numbers written least significant digit first (McLeish et al. 2024, arXiv 2405.17399:
    1204 + 39 = 1243, answered "3421"); difficulty n = the longer operand's digits, the other has 1..n (uniform),
    neither has a leading zero. Reversed digits let a left-to-right model write each digit once its carry is known.
    The chain of thought writes the running sum digit by digit, each with its carry ("3c0;")."""

    name = "addition"
    max_difficulty = 256
    alphabet = "0123456789+=c;"
    description = "addition of two numbers, digits least significant first (difficulty = the longer one's digits)"

    def distinct_problems(self, difficulty: int) -> int:
        exactly, at_most = (10 if difficulty == 1 else 9 * 10 ** (difficulty - 1)), 10**difficulty
        return exactly * (2 * at_most - exactly)  # ordered pairs whose longer operand has exactly n digits

    @staticmethod
    def _number(digits: int, rng: random.Random) -> int:
        return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)

    def _generate(self, difficulty: int, rng: random.Random) -> Problem:
        lengths = [difficulty, rng.randint(1, difficulty)]
        rng.shuffle(lengths)
        return self.problem_of(*(self._number(n, rng) for n in lengths), difficulty)

    def problem_of(self, a: int, b: int, difficulty: int) -> Problem:
        """The problem a + b (e.g. a chosen worst case), its longer operand of `difficulty` digits."""
        total, steps, carry = a + b, [], 0
        ra, rb = str(a)[::-1], str(b)[::-1]
        for i in range(len(str(total))):
            column = (int(ra[i]) if i < len(ra) else 0) + (int(rb[i]) if i < len(rb) else 0) + carry
            carry = column // 10
            steps.append(f"{column % 10}c{carry}")
        return Problem(self.name, difficulty, f"{ra}+{rb}=", str(total)[::-1], tuple(steps))


class AdditionSlotsTask(AdditionTask):
    """4021+93=_____?  Addition as looped transformers answer it (Fan et al. 2024, arXiv 2409.15647): the operands
    least significant digit first, then n + 1 answer slots; the model fills every slot at once, in one forward pass
    (`answered_at_hints`: slot i's position predicts the sum's i-th digit), so carries travel through core steps,
    not through written tokens, and the answer's length is never in doubt. The answer is the sum's n + 1 digits,
    least significant first, a final 0 included ("34210"); exact on every slot. Difficulty n as in `addition`."""

    name = "addition-slots"
    alphabet = "0123456789+=_?"
    description = "addition answered in n + 1 slots in one forward pass (difficulty = the longer operand's digits)"
    step_separator = None
    answered_at_hints = True

    def problem_of(self, a: int, b: int, difficulty: int) -> Problem:
        question = f"{str(a)[::-1]}+{str(b)[::-1]}="
        digits = str(a + b)[::-1].ljust(difficulty + 1, "0")  # reversed: the missing high digit is a final 0
        hints = tuple((len(question) + i + 1, digit) for i, digit in enumerate(digits))  # slot i predicts digit i
        return Problem(self.name, difficulty, question + "_" * len(digits) + "?", digits, (), hints)


class AdditionColumnsTask(AdditionSlotsTask):
    """13_44_10_00_?  The same sums with the digits aligned by the input itself (141 + 43 = 184, answered "4810"):
    column i (least significant first) is the two operands' i-th digits (0 past a number's end) and the slot for
    the sum's i-th digit, for the n + 1 columns. Every digit a slot needs is then at most three tokens back (its
    column and the slot before), so a model with a local attention window computes each column alike at any
    length, and a carry moves at most one column per layer it crosses: the form in which prefix sums extrapolate.
    The answer as in `addition-slots`."""

    name = "addition-columns"
    alphabet = "0123456789_?"
    description = "addition with the operands' digits in aligned columns, answered in slots (difficulty = digits)"

    def problem_of(self, a: int, b: int, difficulty: int) -> Problem:
        def column_digits(x: int) -> str:  # least significant first, 0 past the number's end
            return str(x)[::-1].ljust(difficulty + 1, "0")

        question = "".join(f"{x}{y}_" for x, y in zip(column_digits(a), column_digits(b))) + "?"
        answer = column_digits(a + b)
        hints = tuple((3 * i + 3, digit) for i, digit in enumerate(answer))  # after slot i: digit i
        return Problem(self.name, difficulty, question, answer, (), hints)


class CopyTask(Task):
    """abba?  Copy n symbols (of 8) after the question mark (Fan et al. 2024's copy task, arXiv 2409.15647;
    difficulty = n). The answer's i-th symbol is the input's i-th: a model must find each by its place in the
    input, which positions that count from each string's start make the same at every length. The chain of thought
    writes the symbols one step each ("a;b;b;a;")."""

    name = "copy"
    max_difficulty = 256
    symbols = "abcdefgh"
    alphabet = symbols + "?;"
    description = "copy n symbols (difficulty = n)"

    def distinct_problems(self, difficulty: int) -> int:
        return len(self.symbols) ** difficulty

    def _generate(self, difficulty: int, rng: random.Random) -> Problem:
        text = "".join(rng.choice(self.symbols) for _ in range(difficulty))
        return Problem(self.name, difficulty, text + "?", text, tuple(text))


# --- registry, JSONL ------------------------------------------------------------------------------------------------

TASKS: dict[str, Task] = {task.name: task for task in (ChainTask(), PermutationTask(), ParityTask(), PointerTask(),
                                                        PrefixSumsTask(), AdditionTask(), AdditionSlotsTask(),
                                                        AdditionColumnsTask(), CopyTask())}


def problem_set(tasks: Sequence[Task], difficulties: Sequence[int], n: int, seed: int,
                shuffle: bool = False) -> list[Problem]:
    """n problems per task and difficulty from `seed`, task by task and difficulty by difficulty, or shuffled
    (seeded by `seed` too) into one mixed set whose batches mix difficulties."""
    problems = [p for task in tasks for d in difficulties for p in task.problems(d, n, seed=seed)]
    if shuffle:
        random.Random(seed).shuffle(problems)
    return problems


def get_task(name: str) -> Task:
    if name.startswith("reasoning-gym:"):
        return ReasoningGymTask(name.split(":", 1)[1])
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)} or reasoning-gym:NAME")
    return TASKS[name]


def save_jsonl(problems: list[Problem], path: str | Path) -> Path:
    """Problems as JSON Lines, written whole or not at all."""
    return write_text_atomically(path, "".join(p.to_json() + "\n" for p in problems))


def load_jsonl(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file, one JSON object per line; a malformed line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"problem file {path} does not exist")
    problems = []
    for number, line in enumerate(read_text(path, "problem file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            problems.append(Problem.from_dict(json.loads(line)))
        except (json.JSONDecodeError, ValueError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a problem: {error}") from error
    return problems


MAX_LIST_LENGTH = 10_000  # a command-line list longer than this is a typo, not a plan


# A list option (--steps, --difficulties ...): "1,2,4-8" on the command line; 4 or [1, 2] in a YAML config too
IntList = str | int | list[int]


def parse_int_list(text: IntList, name: str = "list", allow_empty: bool = False) -> list[int]:
    """'1,2,4-6' -> [1, 2, 4, 5, 6] (for command-line difficulty and depth lists); `name` (e.g. "--steps") is
    named in the error for anything else: a descending range, a value given twice (it would be measured twice), an
    empty list (unless `allow_empty`: "" then means none), or more than MAX_LIST_LENGTH values."""
    if isinstance(text, (int, list, tuple)) and not isinstance(text, bool):
        text = ",".join(map(str, text if isinstance(text, (list, tuple)) else [text]))
    values = []
    parts = re.split(r"\s*,\s*", str(text).strip()) if str(text).strip() else []
    if "" in parts:
        raise ValueError(f"{name}: {text!r} has an empty item; give a list such as 1,2,4-8")
    for part in parts:
        try:
            low, high = part.split("-", 1) if "-" in part[1:] else (part, part)
            low, high = int(low), int(high)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a list of integers and ranges such as 1,2,4-8") from None
        if high < low:
            raise ValueError(f"{name}: {part!r} is a descending range; write {high}-{low}")
        if len(values) + high - low + 1 > MAX_LIST_LENGTH:
            raise ValueError(f"{name}: {text!r} holds more than {MAX_LIST_LENGTH} values "
                             "(recurrent_lm.tasks.MAX_LIST_LENGTH)")
        repeated = sorted(set(values) & set(range(low, high + 1)))
        if repeated:
            raise ValueError(f"{name}: {text!r} gives {repeated[0]} twice; give each value once")
        values += range(low, high + 1)
    if not values and not allow_empty:
        raise ValueError(f"{name}: {text!r} holds no values; give a list such as 1,2,4-8")
    return values


def task_tokenizer(task_names: Iterable[str], extra: str = "") -> RecurrentCharacterTokenizer:
    """A character tokenizer covering every character the given tasks render, and the `extra` characters (a process
    reward model's step tag and labels)."""
    alphabet = "".join(get_task(name).alphabet for name in task_names)
    if not alphabet:
        raise ValueError(f"tasks {list(task_names)} have free-text alphabets: train a BPE tokenizer instead")
    return character_tokenizer(alphabet + extra)
