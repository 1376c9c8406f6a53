"""An independent held-out check of the shipped easy-to-hard models: problems generated here from the README's
definitions alone (no code of recurrent_lm.tasks), fed to the model through transformers' own Auto classes, and
scored by this file's own scorer."""

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import recurrent_lm  # noqa: F401  (registers the RecurrentLM Auto classes)

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
