"""The lm-evaluation-harness model "recurrent_lm" (needs the optional extra `pip install -e ".[lm-eval]"`):
importing this module registers it. Every loglikelihood and generation call runs at the depth given in model_args
(num_steps, and optionally exit_criterion / exit_threshold / min_steps)."""

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # an optional extra
    raise ImportError('lm-evaluation-harness is not installed: pip install -e ".[lm-eval]"') from error

import recurrent_lm  # noqa: F401  (registers RecurrentLM with the transformers Auto classes)


@register_model("recurrent_lm")
class RecurrentLMEval(HFLM):
    """HFLM whose every forward and generate call carries the recurrent depth settings."""

    def __init__(self, pretrained, num_steps: int | None = None, exit_criterion: str | None = None,
                 exit_threshold: float | None = None, min_steps: int = 1, init_scale: float = 0.0, **kwargs):
        self.depth = {"num_steps": int(num_steps) if num_steps is not None else None, "init_scale": float(init_scale)}
        if exit_criterion:
            self.depth.update(exit_criterion=exit_criterion, min_steps=int(min_steps),
                              exit_threshold=float(exit_threshold) if exit_threshold is not None else None)
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained, backend="causal", **kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inps, **self.depth).logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        return super()._model_generate(context, max_length, stop, **{**generation_kwargs, **self.depth})
