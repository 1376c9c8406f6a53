"""How many core steps a call runs: the one place that checks a depth given by a caller."""

from numbers import Integral
from typing import Any

import torch
from torch import Tensor

StepCounts = tuple[int, int]  # (steps run without gradient, steps run with gradient)

MAX_NUM_STEPS = 100_000  # more core steps per token than this is a typo: raise it if you mean it


def _step_count(value: Any, what: str) -> int:
    """An int (or 0-d integer tensor) >= 0; anything else is a clear error."""
    if isinstance(value, Tensor):
        if value.ndim != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{what} must be an integer or a 0-d integer tensor, got a tensor {tuple(value.shape)} {value.dtype}")
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    if value > MAX_NUM_STEPS:
        raise ValueError(f"{what} = {value} exceeds {MAX_NUM_STEPS} core steps per token "
                         "(recurrent_lm.depth.MAX_NUM_STEPS; raise it if you mean it)")
    return int(value)


def resolve_num_steps(num_steps: Any) -> StepCounts:
    """num_steps as given by a caller -> (steps without gradient, steps with gradient).

    An int r runs r steps that all keep the autograd graph (when grad is enabled at all); a pair (n, k) runs n
    steps under no_grad and then k steps with gradient (truncated backprop).
    """
    if isinstance(num_steps, (tuple, list)) or (isinstance(num_steps, Tensor) and num_steps.ndim == 1):
        if len(num_steps) != 2:
            raise ValueError(f"num_steps as a pair must be (steps without gradient, steps with gradient), got {num_steps!r}")
        counts = (_step_count(num_steps[0], "num_steps[0]"), _step_count(num_steps[1], "num_steps[1]"))
        if sum(counts) < 1:
            raise ValueError(f"num_steps must total at least 1 step, got {tuple(counts)}")
        return counts
    steps = _step_count(num_steps, "num_steps")
    if steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {steps}")
    return 0, steps
