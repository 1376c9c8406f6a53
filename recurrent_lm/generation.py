"""Generation with depth control: plain transformers generate (any num_steps, adaptive exit, continuous CoT all
ride on the model's forward and its generation hooks) and self-speculative decoding (draft shallow, verify deep)."""

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .adaptive import AdaptiveExit
from .cache import CACHE_NAME, RecurrentCache
from .depth import check_count, resolve_num_steps


@dataclass
class GenerateDepthOutput(GenerateDecoderOnlyOutput):
    """transformers' generate output plus the depth each generated token used.

    steps_per_token: (batch, generated tokens) core steps behind each generated token (the first comes from the
        prompt's last position); with speculative decoding, the verify depth.
    prompt_steps: (batch, prompt tokens) core steps each prompt position ran.
    acceptance_rate / drafted_tokens / accepted_tokens / forward_passes: speculative decoding statistics.
    """

    steps_per_token: Tensor | None = None
    prompt_steps: Tensor | None = None
    acceptance_rate: float | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None
    forward_passes: int | None = None


def check_generation_args(num_steps, max_new_tokens, exit_criterion, exit_threshold, min_steps, draft_steps,
                          draft_length, config=None, prompt_num_steps=None) -> int | None:
    """Clear errors for bad generation settings, before any compute (`rlm generate` calls it before it loads the
    model). Returns the depth per token: num_steps resolved (config's default when None), or None without a
    config to take a default from."""
    steps = resolve_num_steps(num_steps, config).total if num_steps is not None or config is not None else None
    if max_new_tokens is not None:
        check_count(max_new_tokens, "max_new_tokens", minimum=0)
    if steps is not None and min_steps is not None and min_steps > steps:  # with or without an exit rule
        raise ValueError(f"min_steps ({min_steps}) > max steps (num_steps = {steps})")
    if exit_criterion is not None:
        AdaptiveExit(exit_criterion, exit_threshold, min_steps)  # its own checks of the threshold and min_steps
    elif exit_threshold is not None:
        raise ValueError("exit_threshold given without exit_criterion")
    if prompt_num_steps is not None:
        resolve_num_steps(prompt_num_steps)  # an integer >= 1 within MAX_NUM_STEPS
        if draft_steps is not None:
            raise ValueError("prompt_num_steps applies to plain and adaptive decoding, not to speculative decoding")
    if draft_steps is not None:
        check_count(draft_steps, "draft_steps")
        if steps is not None and draft_steps > steps:
            raise ValueError(f"draft_steps ({draft_steps}) > verify steps (num_steps = {steps})")
        check_count(draft_length, "draft_length")
    return steps


def steps_per_generated_token(calls: list[Tensor], generated: int) -> Tensor:
    """From the steps each forward of generate ran per position ((batch, fed tokens), one per call): the prompt
    call's last position, then one entry per decode call."""
    per_token = [calls[0][:, -1:]] + [c[:, -1:] for c in calls[1:]]
    return torch.cat(per_token, dim=1)[:, :generated]


@torch.no_grad()
def speculative_generate(model, input_ids: Tensor, attention_mask: Tensor | None, *, num_steps: int, draft_steps: int,
                         draft_length: int, max_new_tokens: int, eos_token_id=None, pad_token_id=None,
                         init_scale: float | None = None, generator: torch.Generator | None = None, streamer=None,
                         cache: RecurrentCache | None = None) -> GenerateDepthOutput:
    """Greedy self-speculative decoding: draft `draft_length` tokens at `draft_steps`, then verify them all in one
    forward at `num_steps`. The longest drafted prefix that the deep model agrees with is kept, plus the deep
    model's own next token, so the output equals plain greedy decoding at num_steps (exactly, when the initial
    state is deterministic, init_scale=0). Never emits more than max_new_tokens. Rows of a batch advance in
    lockstep by the smallest acceptance, each taking its own verified next token."""
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = torch.tensor([] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                       dtype=torch.long, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    cache = RecurrentCache() if cache is None else cache
    kwargs = dict(init_scale=init_scale, generator=generator, cache=cache, use_cache=True)
    sequences, finished = input_ids, torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    drafted = accepted = passes = 0

    def run(tokens: Tensor, steps: int) -> Tensor:
        nonlocal attention_mask, passes
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, tokens.shape[1])], dim=1)
        passes += 1
        return model(tokens, attention_mask=attention_mask, num_steps=steps, **kwargs).logits

    def emit(tokens: Tensor) -> None:
        nonlocal sequences, finished
        tokens = torch.where(finished[:, None], torch.full_like(tokens, pad), tokens)
        sequences = torch.cat([sequences, tokens], dim=1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        finished = finished | torch.isin(tokens, eos).any(dim=1)

    if streamer is not None:  # as transformers' generate does: the prompt first, then each new token
        streamer.put(input_ids.cpu())
    if max_new_tokens > 0:  # the prompt, at the verify depth, gives the first token
        passes += 1
        logits = model(input_ids, attention_mask=attention_mask, num_steps=num_steps, logits_to_keep=1, **kwargs).logits
        emit(logits[:, -1:].argmax(-1))
    while sequences.shape[1] - input_ids.shape[1] < max_new_tokens and not bool(finished.all()):
        remaining = max_new_tokens - (sequences.shape[1] - input_ids.shape[1])
        k = min(draft_length, remaining - 1)  # k drafts + 1 verified token never pass max_new_tokens
        pending = sequences[:, -1:]
        drafts = []
        for _ in range(k):
            drafts.append(run(pending if not drafts else drafts[-1], draft_steps)[:, -1:].argmax(-1))
        cache.crop(cache.get_seq_length() - k)
        attention_mask = attention_mask[:, : attention_mask.shape[1] - k]
        candidates = torch.cat([pending, *drafts], dim=1)  # (batch, k + 1)
        verified = run(candidates, num_steps).argmax(-1)  # verified[:, i] follows candidates[:, i]
        agree = (verified[:, :k] == candidates[:, 1:]).long().cumprod(dim=1).sum(dim=1)  # per-row accepted prefix
        keep = int(agree.min()) if k else 0
        drafted, accepted = drafted + k * batch, accepted + int(agree.sum())
        cache.crop(cache.get_seq_length() - (k - keep))  # forget the cache entries of rejected drafts
        attention_mask = attention_mask[:, : attention_mask.shape[1] - (k - keep)]
        emit(torch.cat([candidates[:, 1 : keep + 1], verified[:, keep : keep + 1]], dim=1))
    if streamer is not None:
        streamer.end()
    generated = sequences.shape[1] - input_ids.shape[1]
    return GenerateDepthOutput(
        sequences=sequences, **{CACHE_NAME: cache},
        steps_per_token=torch.full((batch, generated), num_steps, dtype=torch.long),
        acceptance_rate=accepted / drafted if drafted else None, drafted_tokens=drafted, accepted_tokens=accepted,
        forward_passes=passes,
    )
