"""Distillation from a teacher's logits: the student's next-token distributions pulled toward another model's on the
same batch (Hinton et al. 2015), e.g. a retrofitted recurrent model toward the pretrained source it was cut from.

The teacher runs without gradient and stays outside the trained module: not a parameter, not in a checkpoint, not
moved or sharded by the strategy (each rank holds its own copy, moved to the batch's device on first use).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from recurrent_lm.config import read_config_json
from recurrent_lm.data import takes_loss
from recurrent_lm.loading import load_any_causal_lm, model_dir, model_type


class Teacher:
    """A model whose logits a student learns from: any causal LM that `--model` resolves (a directory, a shipped
    name, a GGUF file or an installed source's short name); a RecurrentLM runs at `num_steps` (its own
    mean_recurrence when None) from a zero state, so that its targets do not change from step to step."""

    def __init__(self, source: str, num_steps: int | None, vocab_size: int):
        kind = model_type(source)  # what the teacher is, from its config alone: refused before any weight loads
        recurrent = kind == "recurrent_lm"
        if num_steps is not None and not recurrent:
            raise ValueError(f"model.distill_depth sets a recurrent teacher's depth: {source} is a {kind!r} model, "
                             "which has none")
        teacher_vocab = read_config_json(model_dir(source) / "config.json").get("vocab_size")
        if teacher_vocab != vocab_size:
            raise ValueError(f"model.distill_from {source}: its vocabulary has {teacher_vocab} tokens, the student's "
                             f"{vocab_size}; a teacher must share the student's tokenizer")
        self.model = load_any_causal_lm(source).requires_grad_(False)
        self.num_steps = (num_steps or self.model.config.mean_recurrence) if recurrent else None

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        self.model.to(input_ids.device)  # a no-op after the first step
        kwargs = {} if self.num_steps is None else {"num_steps": self.num_steps, "init_scale": 0.0}
        return self.model(input_ids, attention_mask=attention_mask, **kwargs).logits.float()


def distilled_positions(labels: Tensor, attention_mask: Tensor, on: str) -> Tensor:
    """Which positions' predictions (logits[:, t], predicting token t + 1) learn from the teacher: "labels", those
    that take the loss (the answer, under data.loss_on answer); "all", every position whose next token is real."""
    if on == "labels":
        return takes_loss(labels)
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return positions


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, positions: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the temperature-softened next-token distributions, averaged over the chosen
    positions and scaled by temperature^2, so that its gradients keep their size as the temperature changes.
    A batch without such positions (answers all cut off, say) contributes 0, not a NaN."""
    if not positions.any():
        return student_logits.sum() * 0.0
    student = F.log_softmax(student_logits[positions].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[positions] / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2
