"""The recurrence depth: how many core steps a forward call runs. Every depth a caller gives is validated here,
every default is resolved here, and the training-time draw lives here.

Names used across the project:
- `num_steps`: the depth of one forward call, as a caller gives it: an int r, or a pair (n, k) = n steps without
  gradient then k with it (truncated backprop). Resolved to `StepCounts(no_grad, grad)`.
- `steps_per_token`: the depth each generated token actually ran (fewer than num_steps where it exited early).
- `step`: the 0-based index of one core application inside a forward call.
"""

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from .options import MAX_NUM_STEPS


class StepCounts(NamedTuple):
    """A resolved depth: `no_grad` steps run without an autograd graph, then `grad` steps with one."""

    no_grad: int
    grad: int

    @property
    def total(self) -> int:
        return self.no_grad + self.grad


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """An integer >= minimum (an int or a 0-d integer tensor; never a bool or a float): the one check for every
    count a caller gives (steps, slots, lengths); anything else is a one-line error that names it."""
    if isinstance(value, Tensor):
        if value.ndim != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer or a 0-d integer tensor, got a tensor {tuple(value.shape)} "
                            f"{value.dtype}")
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _step_count(value: Any, name: str) -> int:
    steps = check_count(value, name, minimum=0)
    if steps > MAX_NUM_STEPS:
        raise ValueError(f"{name} = {steps} exceeds {MAX_NUM_STEPS} core steps per token "
                         "(recurrent_lm.options.MAX_NUM_STEPS; raise it if you mean it)")
    return steps


def resolve_num_steps(num_steps: Any, config=None, training: bool = False,
                      generator: torch.Generator | None = None) -> StepCounts:
    """num_steps as a caller gives it -> StepCounts(no_grad, grad).

    An int r runs r steps that all keep the autograd graph (when grad is enabled at all); a pair (n, k) runs n
    steps under no_grad and then k steps with gradient. None takes the model's default from `config`: a random
    training draw (sample_num_steps, from `generator`) in training mode, mean_recurrence otherwise.
    """
    if num_steps is None:
        if config is None:
            raise ValueError("num_steps is None and no model config gives a default depth")
        if training:
            return sample_num_steps(config.mean_recurrence, config.mean_backprop_depth, generator)
        return StepCounts(0, config.mean_recurrence)
    if isinstance(num_steps, (tuple, list)) or (isinstance(num_steps, Tensor) and num_steps.ndim == 1):
        if len(num_steps) != 2:
            raise ValueError(f"num_steps as a pair must be (steps without gradient, steps with gradient), got {num_steps!r}")
        counts = StepCounts(_step_count(num_steps[0], "num_steps[0]"), _step_count(num_steps[1], "num_steps[1]"))
        if counts.total < 1:
            raise ValueError(f"num_steps must total at least 1 step, got {tuple(counts)}")
        return counts
    steps = _step_count(num_steps, "num_steps")
    if steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {steps}")
    return StepCounts(0, steps)


@dataclass(frozen=True)
class RecurrenceCurriculum:
    """The mean training depth ramping up from `start` to the model's mean_recurrence over the first `share` of
    training, then held (the retrofitting recipe: from 1 or 2 to 4 over 75% of the steps, "1-sqrt" shape). Shapes of
    the ramp, with p the progress through it in [0, 1]: "linear" p; "1-sqrt" 1 - sqrt(1 - p) (slow at first, most of
    the rise at the end); "cosine" (1 - cos(pi p)) / 2.

    Args:
        start: the mean depth at the first step (>= 1).
        share: the share of training steps over which the mean rises (0 < share <= 1).
        shape: "linear", "1-sqrt" or "cosine".
    """

    start: float = 1.0
    share: float = 0.75
    shape: Literal["linear", "1-sqrt", "cosine"] = "1-sqrt"

    def __post_init__(self):
        if self.start < 1 or not 0 < self.share <= 1 or self.shape not in CURRICULUM_SHAPES:
            raise ValueError(f"model.recurrence_curriculum needs start >= 1, 0 < share <= 1 and shape in "
                             f"{', '.join(CURRICULUM_SHAPES)}; got start={self.start}, share={self.share}, "
                             f"shape={self.shape!r}")

    def mean_at(self, progress: float, target: float) -> float:
        """The mean depth at a point of training (progress = step / total steps) that ends at `target`."""
        p = min(1.0, max(0.0, progress / self.share))
        return self.start + (target - self.start) * CURRICULUM_SHAPES[self.shape](p)


CURRICULUM_SHAPES = {"linear": lambda p: p, "1-sqrt": lambda p: 1 - math.sqrt(1 - p),
                     "cosine": lambda p: (1 - math.cos(math.pi * p)) / 2}


def sample_num_steps(mean_recurrence: float, backprop_depth: int, generator: torch.Generator | None = None) -> StepCounts:
    """Draw a training depth r >= 1 and split it into (steps without gradient, steps with gradient).

    r = 1 + Poisson(lambda), lambda ~ LogNormal(mu, 0.5) with E[lambda] = mean_recurrence - 1, so E[r] equals
    mean_recurrence exactly (Huginn's reference draws lambda with mean mean_recurrence, so its mean is one step
    more). The heavy right tail trains the model to keep improving at depths well past the mean. Only the last
    `backprop_depth` steps get gradients, so memory does not grow with r. Give every rank the same seeded
    generator (the training module does) and all ranks run the same depth.
    """
    sigma = 0.5
    if mean_recurrence <= 1:
        depth = 1
    else:
        mu = math.log(mean_recurrence - 1) - sigma**2 / 2
        rate = torch.exp(mu + sigma * torch.randn((), generator=generator))
        depth = int(torch.poisson(rate, generator=generator)) + 1
    return truncated(depth, backprop_depth)


def difficulty_num_steps(difficulty: int, steps_per_difficulty: int, extra_steps: int, backprop_depth: int,
                         generator: torch.Generator | None = None) -> StepCounts:
    """A training depth tied to the problem's size (Fan et al. 2024, looped transformers): difficulty x
    steps_per_difficulty steps, plus 0..extra_steps more drawn uniformly, so the model learns that steps past the
    needed ones must leave a solved state alone. Only the last `backprop_depth` steps get gradients."""
    extra = int(torch.randint(0, extra_steps + 1, (), generator=generator)) if extra_steps else 0
    return truncated(max(1, difficulty * steps_per_difficulty + extra), backprop_depth)


def truncated(depth: int, backprop_depth: int) -> StepCounts:
    """A training depth split for truncated backprop: only its last `backprop_depth` steps get gradients."""
    with_grad = min(backprop_depth, depth)
    return StepCounts(depth - with_grad, with_grad)


def check_depths(depths: list[int], option: str = "--steps") -> list[int]:
    """Test-time depths to evaluate, as an option gives them: at least one, each >= 1."""
    if not depths or min(depths) < 1:
        raise ValueError(f"{option} must all be >= 1 (at least one depth), got {depths}")
    depths = [_step_count(depth, option) for depth in depths]  # integers within MAX_NUM_STEPS
    return depths
