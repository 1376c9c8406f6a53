"""Exit rules on hand-made sequences of states and logits (recurrent_lm.adaptive)."""

import pytest
import torch

from recurrent_lm.adaptive import AdaptiveExit


def run(rule: AdaptiveExit, states=None, logits=None) -> list[list[bool]]:
    """The converged mask after each step (1-based), for one row of positions."""
    tracker, masks = rule.tracker(), []
    steps = len(states if states is not None else logits)
    for step in range(steps):
        state = states[step] if states is not None else torch.zeros(1, logits[step].shape[1], 4)
        masks.append(tracker.converged(step + 1, state, None if logits is None else logits[step]).tolist()[0])
    return masks


def test_latent_rules_stop_where_the_state_stops_moving():
    # position 0 settles after step 2, position 1 keeps moving by 50% per step
    moving = [torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), torch.tensor([[[2.0, 0.0], [1.5, 0.0]]]),
              torch.tensor([[[2.0, 0.0], [2.25, 0.0]]]), torch.tensor([[[2.0, 1e-4], [3.4, 0.0]]])]
    masks = run(AdaptiveExit("latent-diff", 0.01), states=moving)
    assert masks == [[False, False], [False, False], [True, False], [True, False]]
    rotating = [torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[0.0, 2.0]]])]
    assert run(AdaptiveExit("cosine", 1e-3), states=rotating) == [[False], [False], [True]]  # same direction


def test_logit_rules_compare_successive_distributions():
    sure = torch.tensor([[[5.0, 0.0, 0.0]]])
    flipped = torch.tensor([[[0.0, 5.0, 0.0]]])
    assert run(AdaptiveExit("kl", 1e-3), logits=[flipped, sure, sure]) == [[False], [False], [True]]
    assert run(AdaptiveExit("entropy-diff", 1e-3), logits=[sure, flipped]) == [[False], [True]]  # same entropy
    # argmax-stability counts steps without a change of the top token
    top = [flipped, sure, sure, sure, sure]
    assert run(AdaptiveExit("argmax-stability", 3), logits=top) == [[False], [False], [False], [False], [True]]


def test_min_steps_holds_every_position():
    still = [torch.ones(1, 1, 2)] * 4
    assert run(AdaptiveExit("latent-diff", 0.5, min_steps=3), states=still) == [[False], [False], [True], [True]]


@pytest.mark.parametrize("criterion", ["kl", "latent-diff"])
def test_first_step_never_exits(criterion):
    rule = AdaptiveExit(criterion, 1e9)
    assert run(rule, states=[torch.ones(1, 3, 2)], logits=[torch.zeros(1, 3, 5)] if rule.needs_logits else None) == \
        [[False, False, False]]
