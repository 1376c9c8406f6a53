"""Exit rules on hand-made sequences of states and logits (recurrent_lm.adaptive)."""

import pytest
import torch

from recurrent_lm.adaptive import AdaptiveExit, settled_from


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


def test_acceleration_exits_after_two_steps_whose_change_stops_changing():
    """Pappone et al.'s second-order rule: the change of a step against the previous step's, twice in a row. A state
    moving at a constant velocity exits (its step size has settled) where latent-diff, which needs the state itself
    to stop, does not; a position whose step keeps changing does not."""
    steady = [torch.tensor([[[1.0 + t, 10.0], [1.0 + t * t, 10.0]]]) for t in range(6)]
    masks = run(AdaptiveExit("acceleration", 0.01), states=steady)
    # differences from step 2 on, their change from step 3 on, two hits in a row at steps 3 and 4
    assert masks == [[False, False], [False, False], [False, False], [True, False], [True, False], [True, False]]
    assert not any(m[0] for m in run(AdaptiveExit("latent-diff", 0.01), states=steady))


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


def test_gate_exits_where_it_is_sure_from_the_first_step():
    """The learned gate's logit of "settled" per position: exit once 1 - sigmoid(logit) < threshold, no comparison
    with an earlier step needed."""
    gate = lambda state: state[..., 0]  # noqa: E731  (a stand-in gate: the logit is the first channel)
    tracker = AdaptiveExit("gate", 0.1).tracker(gate)
    logits = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [-5.0, 0.0]]])  # sigmoid 0.95, 0.73, 0.007
    assert tracker.converged(1, logits, None).tolist() == [[True, False, False]]
    assert AdaptiveExit("gate", 0.5).tracker(gate).converged(1, logits, None).tolist() == [[True, True, False]]
    assert AdaptiveExit("gate", 0.1, min_steps=2).tracker(gate).converged(1, logits, None).tolist() == [[False] * 3]
    with pytest.raises(ValueError, match="needs a model with a trained exit gate"):
        AdaptiveExit("gate").tracker()
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        AdaptiveExit("gate", 1.0)


def test_settled_step_is_where_agreement_holds_to_the_end():
    agrees = torch.tensor([[False, True, False, True],   # step 1
                           [True, True, True, False],    # step 2
                           [True, True, False, True]])   # step 3
    assert settled_from(agrees).tolist() == [2, 1, 4, 3]  # 4: never settled (steps + 1)
