"""Reward models behind one interface: given prompts and their chains of thought split into steps (the task's
split_steps), a score per step (a process reward model, PRM) or one for the whole solution (an outcome reward
model, ORM). Search and weighted best-of-N read them only through `RewardModel.score` and `RewardModel.flops`.

The Hugging Face conventions, chosen by `convention` (auto: from the checkpoint's architecture):
- "step-tag":                a causal LM reads a step tag after every step and the score is P(good) against P(bad)
                             at the tag (Math-Shepherd's "ки" with "+" / "-"). This project's own PRMs are of this
                             kind (`rlm train --config demo-prm`: tag "#", tokens "+" / "-").
- "token-classification":    a token-classification head read at a step separator token after every step
                             (P(label 1) of two labels, or the sigmoid of one), as Qwen2.5-Math-PRM's head is.
- "sequence-classification": an ORM: one score for the text so far (every step of a partial chain at once).
Every score is in [0, 1]. FLOPs of a scoring pass come from the one counter (recurrent_lm.flops) for the tokens it
reads; a search re-scores each partial chain in full, as search-and-learn does.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

from recurrent_lm import RecurrentConfig
from recurrent_lm.data import collate, encode_step_labels, round_trip, single_token
from recurrent_lm.flops import causal_lm_forward_flops
from recurrent_lm.loading import model_dir
from recurrent_lm.loading import load_any_causal_lm, load_tokenizer, model_type, require_finite_weights
from recurrent_lm.special_tokens import BAD_STEP, GOOD_STEP, STEP_TAG

CONVENTIONS = ("step-tag", "token-classification", "sequence-classification")
AGGREGATIONS = ("last", "min", "prod")


def aggregate(scores: Sequence[float], how: str = "last") -> float:
    """One score for a solution from its step scores: the last step's, the lowest, or their product."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
    if not scores:
        return 0.0
    return {"last": scores[-1], "min": min(scores), "prod": math.prod(scores)}[how]


class RewardModel(ABC):
    """Scores chains of thought. `outcome`: one score per chain (an ORM) rather than one per step."""

    outcome = False

    def __init__(self, model, tokenizer, step_tag: str, batch_size: int = 32):
        self.model, self.tokenizer, self.step_tag, self.batch_size = model.eval(), tokenizer, step_tag, batch_size
        self.forward_kwargs = {"init_scale": 0.0} if isinstance(model.config, RecurrentConfig) else {}

    def check_text(self, text: str, which: str = "policy") -> None:
        """The reward model must read the policy's text as it is: a tokenizer that cannot represent it fails here."""
        round_trip(self.tokenizer, text, f"the reward model's tokenizer (reading the {which}'s text)")

    def encode(self, prompt: str, steps: Sequence[str]) -> dict[str, list[int]]:
        return encode_step_labels(self.tokenizer, prompt, steps, step_tag=self.step_tag)

    def flops(self, prompt: str, steps: Sequence[str]) -> int:
        """FLOPs of scoring one chain: one forward over every token it reads, with the head (LM or classification)
        on every position, as the forward computes it."""
        return self.flops_for(len(self.encode(prompt, steps)["input_ids"]))

    def flops_for(self, length: int) -> int:
        return causal_lm_forward_flops(self.model, length, 0, length, self.forward_kwargs.get("num_steps"))

    def score(self, prompts: Sequence[str], chains: Sequence[Sequence[str]]) -> list[list[float]]:
        """Per chain, a score in [0, 1] for each step (a PRM) or one for the chain (an ORM)."""
        return [scores for scores, _ in self.score_with_flops(prompts, chains)]

    @torch.no_grad()
    def score_with_flops(self, prompts: Sequence[str], chains: Sequence[Sequence[str]]) -> list[tuple[list[float], int]]:
        """Per chain, its scores (as `score`) and the FLOPs of reading it (as `flops`), from one encoding."""
        results = []
        for start in range(0, len(prompts), self.batch_size):
            encoded = [self.encode(p, c) for p, c in zip(prompts[start : start + self.batch_size],
                                                         chains[start : start + self.batch_size])]
            batch = collate(encoded, self.tokenizer.pad_token_id or 0)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                **self.forward_kwargs).logits.float()
            for row, e in enumerate(encoded):
                length = len(e["input_ids"])
                results.append((self.read(logits[row], e["tag_positions"], length), self.flops_for(length)))
        return results

    @abstractmethod
    def read(self, logits: torch.Tensor, tag_positions: list[int], length: int) -> list[float]:
        """The scores in one row's output (right-padded: real tokens first)."""


class StepTagRewardModel(RewardModel):
    """A causal LM that predicts the good or the bad token at the step tag after every step."""

    def __init__(self, model, tokenizer, step_tag: str = STEP_TAG, good: str = GOOD_STEP, bad: str = BAD_STEP,
                 batch_size: int = 32):
        super().__init__(model, tokenizer, step_tag, batch_size)
        single_token(tokenizer, step_tag, "step tag")
        self.candidates = [single_token(tokenizer, good, "good-step token"), single_token(tokenizer, bad, "bad-step token")]

    def read(self, logits, tag_positions, length):
        return logits[tag_positions][:, self.candidates].softmax(-1)[:, 0].tolist()


class TokenClassificationRewardModel(RewardModel):
    """A token-classification head read at the step separator token after every step."""

    def read(self, logits, tag_positions, length):
        at = logits[tag_positions]
        return (at.softmax(-1)[:, 1] if at.shape[-1] > 1 else at[:, 0].sigmoid()).tolist()


class SequenceClassificationRewardModel(RewardModel):
    """An outcome reward model: one score for the chain so far, from a sequence-classification head."""

    outcome = True

    def __init__(self, model, tokenizer, step_tag: str, batch_size: int = 32):
        # the head reads each row's last real token, found through the pad id: without one, a row at a time
        super().__init__(model, tokenizer, step_tag, batch_size if model.config.pad_token_id is not None else 1)

    def encode(self, prompt, steps):
        return {"input_ids": self.tokenizer(prompt + "".join(steps)).input_ids, "tag_positions": []}

    def read(self, logits, tag_positions, length):
        return [float(logits.softmax(-1)[1] if logits.shape[-1] > 1 else logits[0].sigmoid())]


def load_reward_model(path: str | Path, convention: Literal["auto", "step-tag", "token-classification",
                                                                "sequence-classification"] = "auto",
                      step_tag: str | None = None, good: str = GOOD_STEP, bad: str = BAD_STEP,
                      batch_size: int = 32) -> RewardModel:
    """A reward model from a local directory: this project's PRM, or a Hugging Face one of a known convention.
    `step_tag` is the tag (step-tag) or separator token (token-classification) after every step (default "#")."""
    path = model_dir(path)  # a shipped checkpoint's name too (demo-prm)
    if not path.exists():
        raise FileNotFoundError(f"reward model {path} does not exist")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ValueError(f"{path} holds no reward model (a config.json and safetensors weights)")
    model_type(path)  # a config.json that does not parse is one line naming it
    if convention == "auto":
        architectures = " ".join(AutoConfig.from_pretrained(path).architectures or [])
        convention = ("token-classification" if "ForTokenClassification" in architectures else
                      "sequence-classification" if "ForSequenceClassification" in architectures else "step-tag")
    if convention not in CONVENTIONS:
        raise ValueError(f"reward model convention must be one of {CONVENTIONS} or auto, got {convention!r}")
    tokenizer, tag = load_tokenizer(path), step_tag or STEP_TAG
    if convention == "step-tag":
        return StepTagRewardModel(load_any_causal_lm(path), tokenizer, tag, good, bad, batch_size)
    if convention == "token-classification":
        single_token(tokenizer, tag, "step separator")
        model = AutoModelForTokenClassification.from_pretrained(path)
        require_finite_weights(model, path)
        return TokenClassificationRewardModel(model, tokenizer, tag, batch_size)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    require_finite_weights(model, path)
    return SequenceClassificationRewardModel(model, tokenizer, tag, batch_size)



def step_label_accuracy(scorer: RewardModel, prompts: Sequence[str], chains: Sequence[Sequence[str]],
                        labels: Sequence[Sequence[bool]], threshold: float = 0.5) -> dict[str, float]:
    """How often a PRM's step scores, cut at `threshold`, agree with step labels; beside the rate a constant guess
    of the majority label reaches, and the agreement on good and on bad steps apart (an error detector that calls
    everything good scores high on chains that are mostly right)."""
    pairs = [(score >= threshold, label) for scores, chain_labels in zip(scorer.score(prompts, chains), labels)
             for score, label in zip(scores, chain_labels)]
    good = [said for said, label in pairs if label]
    bad = [not said for said, label in pairs if not label]
    return {"steps": len(pairs), "accuracy": sum(said == label for said, label in pairs) / len(pairs),
            "majority_rate": max(len(good), len(bad)) / len(pairs),
            "good_steps": len(good), "accuracy_on_good": sum(good) / len(good) if good else math.nan,
            "bad_steps": len(bad), "accuracy_on_bad": sum(bad) / len(bad) if bad else math.nan}
