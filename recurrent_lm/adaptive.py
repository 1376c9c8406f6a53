"""Per-token adaptive depth: stop unrolling the core for a token once its prediction (or latent state) settles.

Each criterion compares step t with step t-1, for every position of every row, from step max(2, min_steps) on:
- "kl":               KL(p_t || p_{t-1}) of the next-token distributions < threshold (Huginn's default, 1e-3)
- "entropy-diff":     |H(p_t) - H(p_{t-1})| < threshold
- "latent-diff":      ||s_t - s_{t-1}|| / ||s_t|| < threshold (no decoding needed)
- "cosine":           1 - cos(s_t, s_{t-1}) < threshold (no decoding needed)
- "acceleration":     ||d_t - d_{t-1}|| / ||s_t|| < threshold at two steps in a row, d_t = s_t - s_{t-1}: the
                      second-order step-size rule of Pappone et al. (arXiv 2509.23314; their two-hit check, made
                      scale-free here by the state's norm), from step 4 on (no decoding needed)
- "argmax-stability": the top token has not changed for `threshold` consecutive steps (an integer, e.g. 5)
- "gate":             1 - p < threshold, where p is a learned exit gate's probability that the prediction has
                      settled (RecurrentLM.exit_gate: a small MLP on the state; from step 1 on, no comparison)
The logit criteria decode every step through the coda (the logit lens); the compute counter counts that, and the
gate's own (small) cost.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .depth import check_count

if TYPE_CHECKING:
    from .active import ActiveSet

CRITERIA = ("kl", "entropy-diff", "latent-diff", "cosine", "acceleration", "argmax-stability", "gate")
DEFAULT_THRESHOLDS = {"kl": 1e-3, "entropy-diff": 1e-3, "latent-diff": 0.03, "cosine": 1e-3, "acceleration": 0.03,
                      "argmax-stability": 5, "gate": 1e-2}
ACCELERATION_HITS = 2  # the acceleration rule exits after this many steps in a row under its threshold
THRESHOLD_SCALES = (10.0, 1.0, 0.1, 0.01)  # a sweep's thresholds: the criterion's default times these ...
STABLE_STEPS = (2, 3, 5, 8)  # ... except argmax-stability, which counts steps


@dataclass(frozen=True)
class AdaptiveExit:
    criterion: str
    threshold: float | None = None  # None: the criterion's default
    min_steps: int = 1

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown exit criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.threshold is not None and not self.threshold > 0:
            raise ValueError(f"exit threshold must be > 0, got {self.threshold}")
        if self.criterion == "gate" and self.threshold is not None and not self.threshold < 1:
            raise ValueError(f"the gate's threshold bounds 1 - p(settled): it must be in (0, 1), got {self.threshold}")
        if self.criterion == "argmax-stability" and self.threshold is not None and self.threshold != int(self.threshold):
            raise ValueError(f"argmax-stability counts steps: its threshold must be an integer, got {self.threshold}")
        check_count(self.min_steps, "min_steps")

    @property
    def limit(self) -> float:
        return DEFAULT_THRESHOLDS[self.criterion] if self.threshold is None else self.threshold

    @property
    def needs_logits(self) -> bool:
        return self.criterion in ("kl", "entropy-diff", "argmax-stability")

    def tracker(self, gate=None) -> "ExitTracker":
        """The per-call state of this rule; `gate` is the model's exit gate (needed by the "gate" criterion)."""
        if self.criterion == "gate" and gate is None:
            raise ValueError("exit criterion 'gate' needs a model with a trained exit gate (config.exit_gate_width "
                             "> 0): train one with `rlm train --config demo-exit-gate`, or choose another criterion")
        return ExitTracker(self, gate)


def settled_from(agrees: Tensor) -> Tensor:
    """agrees: (steps, ...) bool, whether each step's prediction is the one that counts (the final one, or the right
    one). The first step (1-based) from which every later step agrees too; steps + 1 where the last step does not.
    What a learned exit gate is trained to recognise, and the oracle an exit rule is measured against."""
    suffix = agrees.flip(0).long().cumprod(0).flip(0)  # 1 where this step and every later one agree
    return agrees.shape[0] + 1 - suffix.sum(0)


def threshold_grid(criterion: str, thresholds: list[float] | None = None) -> list[float]:
    """The thresholds a sweep of one criterion runs at: the given ones, or the default grid (the criterion's default
    times 10, 1, 0.1 and 0.01; argmax-stability: 2, 3, 5 and 8 stable steps). Each is checked here, so a bad one
    fails before any compute."""
    AdaptiveExit(criterion)  # an unknown criterion is named before anything else
    if thresholds:
        grid = list(thresholds)
    elif criterion == "argmax-stability":
        grid = list(STABLE_STEPS)
    else:
        grid = [DEFAULT_THRESHOLDS[criterion] * scale for scale in THRESHOLD_SCALES]
    for threshold in grid:
        AdaptiveExit(criterion, threshold)
    return grid


class ExitTracker:
    """Holds what one forward call's exit rule remembers per position (the previous state or log-probs, the
    previous step, a count) and says, after each step, which positions have converged."""

    def __init__(self, rule: AdaptiveExit, gate=None):
        self.rule, self.gate = rule, gate
        self.memory: dict[str, Tensor] = {}  # name -> a (batch, seq, ...) tensor over every position of the call

    def recall(self, name: str, active: "ActiveSet | None") -> Tensor | None:
        """What the rule kept under `name` for the positions checked now (None: nothing yet)."""
        kept = self.memory.get(name)
        return kept if kept is None or active is None else active.pack(kept)

    def keep(self, name: str, value: Tensor, active: "ActiveSet | None") -> None:
        """Keep `value` (every position's, or the running positions' packed) under `name`; a copy, so that the
        caller's tensors (a kept latent state) stay as they are."""
        if active is None:
            self.memory[name] = value.clone()
            return
        if name not in self.memory:  # first kept once some positions had stopped: room for every position
            self.memory[name] = value.new_zeros((active.rows, active.seq) + value.shape[2:])
        self.memory[name][active.batch, active.position] = value[0]

    def converged(self, step: int, state: Tensor, logits: Tensor | None, active: "ActiveSet | None" = None) -> Tensor:
        """step is 1-based. state (and logits) hold every position, (batch, seq, ...), or with `active` the running
        positions only, packed (1, N, ...) (the first call always holds every position). Returns a (batch, seq)
        bool mask, True where a position checked now has converged."""
        rule = self.rule
        if rule.criterion == "gate":
            unsettled = torch.sigmoid(-self.gate(state).float())  # 1 - p(settled), exact for small values too
            return self._every_position((unsettled < rule.limit) & (step >= rule.min_steps), active)
        current = logits.float().log_softmax(-1) if rule.needs_logits else state.float()
        previous = self.recall("previous", active)
        self.keep("previous", current, active)
        if previous is None:  # the first step has nothing to compare with
            self.keep("count", torch.zeros(state.shape[:2], dtype=torch.long, device=state.device), None)
            return torch.zeros(state.shape[:2], dtype=torch.bool, device=state.device)
        if rule.criterion == "kl":
            score = F.kl_div(previous, current, log_target=True, reduction="none").sum(-1)  # KL(p_t || p_{t-1})
        elif rule.criterion == "entropy-diff":
            entropy = lambda logp: -(logp.exp() * logp).sum(-1)  # noqa: E731
            score = (entropy(current) - entropy(previous)).abs()
        elif rule.criterion == "latent-diff":
            score = (current - previous).norm(dim=-1) / current.norm(dim=-1).clamp_min(1e-12)
        elif rule.criterion == "cosine":
            score = 1 - F.cosine_similarity(current, previous, dim=-1)
        else:  # the counting rules: argmax-stability and acceleration
            if rule.criterion == "argmax-stability":
                hit = current.argmax(-1) == previous.argmax(-1)
            else:  # the step's change against the previous step's, relative to the state; two hits in a row
                delta, previous_delta = current - previous, self.recall("delta", active)
                self.keep("delta", delta, active)
                if previous_delta is None:  # the first change has nothing to compare with
                    return self._every_position(torch.zeros(state.shape[:2], dtype=torch.bool, device=state.device),
                                                active)
                hit = (delta - previous_delta).norm(dim=-1) / current.norm(dim=-1).clamp_min(1e-12) < rule.limit
            count = self.recall("count", active)
            count = torch.where(hit, count + 1, torch.zeros_like(count))
            self.keep("count", count, active)
            needed = rule.limit if rule.criterion == "argmax-stability" else ACCELERATION_HITS
            return self._every_position((count >= needed) & (step >= rule.min_steps), active)
        return self._every_position((score < rule.limit) & (step >= rule.min_steps), active)

    @staticmethod
    def _every_position(done: Tensor, active: "ActiveSet | None") -> Tensor:
        """A verdict on the running positions as a (batch, seq) mask (False where a position was not checked)."""
        return done if active is None else active.spread(done, False)
