"""An independent held-out check of the shipped easy-to-hard models: problems generated here from the README's
definitions alone (no code of recurrent_lm.tasks), fed to the model through transformers' own Auto classes, and
scored by this file's own scorer."""

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import recurrent_lm.model  # noqa: F401  (registers the RecurrentLM Auto classes)

CHECKPOINTS = Path(__file__).parent.parent / "checkpoints"


def running_parity(bits: str) -> str:
    out, parity = [], 0
    for bit in bits:
        parity ^= bit == "1"
        out.append("1" if parity else "0")
    return "".join(out)


def prefix_sums_accuracy(model, tokenizer, strings: list[str], depth: int) -> float:
    """The README's prefix-sums definition: the prompt is the bits then "?"; the answer at bit i, the parity of
    bits 1..i, is the model's greedy prediction at bit i's position (after bos). Exact-sequence accuracy."""
    ids = tokenizer([bits + "?" for bits in strings], return_tensors="pt").input_ids  # one length: no padding
    assert ids.shape[1] == len(strings[0]) + 2  # bos, one token a bit, "?"
    with torch.no_grad():
        predicted = model(ids, num_steps=depth, init_scale=0.0).logits[:, 1:-1].argmax(-1)
    right = [tokenizer.decode(row.tolist()) == running_parity(bits) for row, bits in zip(predicted, strings)]
    return sum(right) / len(strings)


def test_shipped_prefix_sums_model_needs_and_uses_depth_beyond_its_training_lengths():
    """Trained on at most 16 bits: 64-bit strings (4x) are solved with 64 core steps and not at the training
    depth (16)."""
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINTS / "prefix-sums").eval()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINTS / "prefix-sums")
    rng = random.Random(20261207)
    strings = ["".join(rng.choice("01") for _ in range(64)) for _ in range(24)]
    assert prefix_sums_accuracy(model, tokenizer, strings, depth=64) >= 0.9
    assert prefix_sums_accuracy(model, tokenizer, strings, depth=16) <= 0.3


def addition_accuracy(model, tokenizer, pairs: list[tuple[int, int]], depth: int) -> float:
    """The README's addition definition: the prompt is both numbers written least significant digit first, "+"
    between them and "=" after; the answer, the sum written the same way, is generated greedily up to eos."""
    right = 0
    for a, b in pairs:
        ids = tokenizer(f"{str(a)[::-1]}+{str(b)[::-1]}=", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=len(str(a + b)) + 2, do_sample=False, num_steps=depth,
                             init_scale=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        sequence = out if isinstance(out, torch.Tensor) else out.sequences
        text = tokenizer.decode(sequence[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        right += text == str(a + b)[::-1]
    return right / len(pairs)


def test_shipped_addition_model_adds_numbers_of_its_training_length():
    """Operands of 8-10 digits (trained: 1-10). Longer ones are where it fails (docs/easy-to-hard.md)."""
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINTS / "addition").eval()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINTS / "addition")
    rng = random.Random(20261208)
    pairs = [(rng.randrange(10**7, 10**10), rng.randrange(10**7, 10**10)) for _ in range(24)]
    assert addition_accuracy(model, tokenizer, pairs, depth=4) >= 0.9


def test_shipped_parity_model_needs_and_uses_depth_beyond_its_training_lengths():
    """The README's parity definition: the bits then "?", the answer "1" when an odd number of them are 1, written
    greedily after the prompt. Trained on at most 20 bits: 40-bit strings (2x) are answered with 40 core steps,
    and at the training depth (20) no better than a coin can."""
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINTS / "parity").eval()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINTS / "parity")
    rng = random.Random(20261209)
    strings = ["".join(rng.choice("01") for _ in range(40)) for _ in range(32)]
    ids = tokenizer([bits + "?" for bits in strings], return_tensors="pt").input_ids  # one length: no padding

    def accuracy(depth: int) -> float:
        with torch.no_grad():
            predicted = model(ids, num_steps=depth, init_scale=0.0).logits[:, -1].argmax(-1)
        truth = ["1" if bits.count("1") % 2 else "0" for bits in strings]
        return sum(tokenizer.decode([int(p)]) == t for p, t in zip(predicted, truth)) / len(strings)

    assert accuracy(40) >= 0.9
    assert accuracy(20) <= 0.75


def columns_accuracy(model, tokenizer, pairs: list[tuple[int, int]], digits: int, depth: int) -> float:
    """The README's addition-columns definition: for i = 0..digits, the two operands' i-th digits (least
    significant first, 0 past a number's end) and a slot "_", then "?"; the model's greedy prediction at slot i is
    the sum's i-th digit (least significant first, digits + 1 of them). Exact on every slot."""
    def column_digits(x: int) -> str:
        return str(x)[::-1].ljust(digits + 1, "0")

    prompts = ["".join(f"{x}{y}_" for x, y in zip(column_digits(a), column_digits(b))) + "?" for a, b in pairs]
    ids = tokenizer(prompts, return_tensors="pt").input_ids  # one length: no padding
    assert ids.shape[1] == 3 * (digits + 1) + 2  # bos, three tokens a column, "?"
    with torch.no_grad():
        predicted = model(ids, num_steps=depth, init_scale=0.0).logits.argmax(-1)
    slots = [1 + 3 * i + 2 for i in range(digits + 1)]  # after bos, column i's slot
    right = [tokenizer.decode(row[slots].tolist()) == column_digits(a + b) for row, (a, b) in zip(predicted, pairs)]
    return sum(right) / len(pairs)


def test_shipped_addition_columns_model_adds_numbers_four_times_its_training_length():
    """Trained on operands of 1-10 digits: 40-digit sums are exact with 20 core steps, and a depth of 1 leaves
    the longer carries unfinished."""
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINTS / "addition-columns").eval()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINTS / "addition-columns")
    rng = random.Random(20261210)
    pairs = [(rng.randrange(10**39, 10**40), rng.randrange(1, 10**rng.randint(1, 40))) for _ in range(32)]
    assert columns_accuracy(model, tokenizer, pairs, 40, depth=20) >= 0.9
    assert columns_accuracy(model, tokenizer, pairs, 40, depth=1) <= 0.5


def test_shipped_copy_model_copies_its_training_length_and_not_beyond():
    """The README's copy definition: n symbols of "abcdefgh" then "?"; the answer, the same n symbols, generated
    greedily after it. Trained on 1-20 symbols: 20 are copied; 30 are not (the failure the README reports)."""
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINTS / "copy").eval()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINTS / "copy")
    rng = random.Random(20261211)

    def accuracy(length: int, depth: int) -> float:
        strings = ["".join(rng.choice("abcdefgh") for _ in range(length)) for _ in range(24)]
        ids = tokenizer([s + "?" for s in strings], return_tensors="pt").input_ids  # one length: no padding
        out = model.generate(ids, max_new_tokens=length + 1, do_sample=False, num_steps=depth, init_scale=0.0,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        copies = [tokenizer.decode(row[ids.shape[1]:].tolist(), skip_special_tokens=True) for row in sequences]
        return sum(c == s for c, s in zip(copies, strings)) / len(strings)

    assert accuracy(20, depth=22) >= 0.75
    assert accuracy(30, depth=32) <= 0.2
