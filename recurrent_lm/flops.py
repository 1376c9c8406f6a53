"""The one compute counter: forward FLOPs of a RecurrentLM, used by every evaluation in this project.

Counted: every matrix multiply (2 FLOPs per multiply-add) of the linear layers a token passes through, and the
two attention products (q k^T and attn v) of every attention layer. Attention is counted at the dense q x k size
the kernel computes (q new tokens against context + q keys), as torch's FlopCounterMode and the usual MFU formula
do; norms, activations and rotary embeddings (a few FLOPs per channel) are left out.

A model with r core steps passes every token through prelude + r * (adapter + core) + coda, so compute is linear
in r: the latent model's "thinking longer" and a chain-of-thought model's "writing more tokens" land on one axis.
Under adaptive exit each position is charged the steps it ran and the exit checks it made (positions_flops), as
the model computes them: a position that has exited is not computed any more (recurrent_lm.active). The latent
rules' checks (latent-diff, cosine, acceleration: a few FLOPs per channel, like norms) are left out; the logit
lens and the learned gate are counted.
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .config import RecurrentConfig
from .depth import resolve_num_steps


@dataclass(frozen=True)
class FlopCount:
    flops: int  # forward FLOPs
    params: int  # matmul parameters each new token passes through (layers applied r times counted r times)

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.flops + other.flops, self.params + other.params)


def forward_flops(config: RecurrentConfig, num_steps: int | tuple[int, int], new_tokens: int = 1,
                  context_length: int = 0, batch_size: int = 1, logit_tokens: int | None = None,
                  lens_decodes: int = 0, gate_checks: int = 0) -> FlopCount:
    """FLOPs of one forward call that feeds `new_tokens` tokens (per sequence) with `context_length` tokens already
    in the cache, every token running `num_steps` core steps (as forward takes them: an int or a (no-grad, grad)
    pair), computing logits for `logit_tokens` positions (default: all new tokens), plus `lens_decodes` extra passes
    of every new token through the coda and the head (the logit lens that the kl, entropy-diff and argmax-stability
    exits read each step), plus `gate_checks` evaluations of the learned exit gate on every new token."""
    steps = resolve_num_steps(num_steps).total
    if new_tokens < 0 or context_length < 0 or batch_size < 1:
        raise ValueError(f"need new_tokens >= 0, context_length >= 0, batch_size >= 1; got "
                         f"{new_tokens}, {context_length}, {batch_size}")
    logit_tokens = new_tokens if logit_tokens is None else min(logit_tokens, new_tokens)
    token = token_flops(config, steps, context_length + new_tokens, lens_decodes, gate_checks)
    flops = batch_size * (new_tokens * token + logit_tokens * head_flops(config))
    return FlopCount(flops=flops, params=_params(config, steps))


def positions_flops(config: RecurrentConfig, steps: Sequence[int], context_length: int = 0, logit_tokens: int = 1,
                    lens_decodes: Sequence[int] | None = None, gate_checks: Sequence[int] | None = None) -> FlopCount:
    """FLOPs of one forward call of one sequence whose new positions each ran their own depth (adaptive exit): a
    position is charged the core steps it ran (`steps`, one per new token), its own logit-lens passes and gate
    checks (one count per token each), and attention over every key of the call, as the packed kernel computes
    it; a position that has exited costs nothing more. With equal depths this is forward_flops."""
    steps = [resolve_num_steps(s).total for s in steps]
    keys = context_length + len(steps)
    lens = lens_decodes if lens_decodes is not None else [0] * len(steps)
    gates = gate_checks if gate_checks is not None else [0] * len(steps)
    if not len(steps) == len(lens) == len(gates):
        raise ValueError(f"need one depth, lens count and gate count per position; got {len(steps)}, {len(lens)}, "
                         f"{len(gates)}")
    per_kind = Counter(zip(steps, lens, gates))  # positions that ran alike cost alike: count each kind once
    flops = sum(n * token_flops(config, s, keys, lens_n, gates_n) for (s, lens_n, gates_n), n in per_kind.items())
    flops += min(logit_tokens, len(steps)) * head_flops(config)
    return FlopCount(flops=flops, params=_params(config, max(steps, default=1)))


def token_flops(config: RecurrentConfig, steps: int, keys: int, lens_decodes: int = 0, gate_checks: int = 0) -> int:
    """FLOPs of one new token through the prelude, `steps` core steps and the coda (without the head), each
    attention layer against `keys` keys, plus its logit-lens passes (coda and head) and exit-gate checks."""
    d, coda = config.hidden_size, config.num_coda_layers
    blocks = config.num_prelude_layers + steps * config.num_core_layers + coda
    lens = lens_decodes * (2 * (coda * _block_params(config) + config.vocab_size * d) + coda * 4 * keys * d)
    gates = gate_checks * 2 * (d + 1) * config.exit_gate_width  # its two linear layers
    return 2 * _body_params(config, steps) + blocks * 4 * keys * d + lens + gates


def head_flops(config: RecurrentConfig) -> int:
    """FLOPs of the LM head on one position."""
    return 2 * config.vocab_size * config.hidden_size


def _block_params(config: RecurrentConfig) -> int:
    d, kv_width = config.hidden_size, config.kv_heads * config.head_dim  # kv_width is d, or less under GQA
    return 2 * d * d + 2 * d * kv_width + 3 * d * config.intermediate_size  # q, out, k, v; fused gate/up, down


def _body_params(config: RecurrentConfig, steps: int) -> int:
    """Matmul parameters a token passes through below the head, at `steps` core steps. The adapter maps [state,
    input] (2d) -> d: its state half runs every step, its input half once per forward; with skip_first_injection
    the first step reads the prelude's output without it."""
    d = config.hidden_size
    blocks = config.num_prelude_layers + steps * config.num_core_layers + config.num_coda_layers
    injections = steps - 1 if config.skip_first_injection else steps
    return blocks * _block_params(config) + injections * d * d + (d * d if injections else 0)


def _params(config: RecurrentConfig, steps: int) -> int:
    return _body_params(config, steps) + config.vocab_size * config.hidden_size


def generation_flops(config: RecurrentConfig, prompt_length: int, steps_per_token: Sequence[int], batch_size: int = 1,
                     prompt_steps: int | list[int] | None = None, lens_decodes: Sequence[int] | None = None,
                     prompt_lens_decodes: int | list[int] = 0, gate_checks: Sequence[int] | None = None,
                     prompt_gate_checks: int | list[int] = 0) -> FlopCount:
    """FLOPs of generating tokens with a KV cache: one prefill of the prompt that yields the first token, then one
    single-token forward for each further token. `steps_per_token`: the depth each generated token ran (one value
    repeated for a fixed depth, fewer steps where adaptive exit stopped early); the prefill runs `prompt_steps`
    core steps (default: the first token's depth), or, a list, one depth per prompt position (adaptive exit).
    `lens_decodes` / `prompt_lens_decodes`: logit-lens passes of each decode call and of the prefill (per prompt
    position, as a list); `gate_checks` / `prompt_gate_checks`: exit-gate evaluations, likewise.
    Logits are computed for the last position only, as generate does."""
    steps = list(steps_per_token)
    if not steps:
        return FlopCount(0, 0)
    lens = list(lens_decodes) if lens_decodes is not None else [0] * len(steps)
    gates = list(gate_checks) if gate_checks is not None else [0] * len(steps)
    prompt_depth = prompt_steps if prompt_steps is not None else steps[0]
    if isinstance(prompt_depth, list):  # one depth per prompt position
        every = lambda count: count if isinstance(count, list) else [count] * prompt_length  # noqa: E731
        total = positions_flops(config, prompt_depth, 0, 1, every(prompt_lens_decodes), every(prompt_gate_checks))
        total = FlopCount(total.flops * batch_size, total.params)
    else:
        total = forward_flops(config, prompt_depth, prompt_length, 0, batch_size, logit_tokens=1,
                              lens_decodes=prompt_lens_decodes, gate_checks=prompt_gate_checks)
    for i, token_steps in enumerate(steps[1:]):
        total = total + forward_flops(config, token_steps, 1, prompt_length + i, batch_size, lens_decodes=lens[i + 1],
                                      gate_checks=gates[i + 1])
    return total


def causal_lm_forward_flops(model, new_tokens: int, context_length: int = 0, logit_tokens: int = 1,
                            num_steps: int | None = None) -> int:
    """FLOPs of one forward call of any transformers model over `new_tokens` tokens with `context_length` tokens
    already in its cache, computing logits (or scores) for `logit_tokens` positions: a RecurrentLM through
    forward_flops at `num_steps` (default mean_recurrence); any other model from its linear layers (2 FLOPs per
    weight per token; a classification head counts as one of them) and its attention (4 * layers * queries * keys *
    attention width), the same rules."""
    config = model.config
    if new_tokens <= 0:
        return 0
    if isinstance(config, RecurrentConfig):
        steps = resolve_num_steps(num_steps, config).total
        return forward_flops(config, steps, new_tokens, context_length, logit_tokens=logit_tokens).flops
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    head_params = head.weight.numel() if head is not None else 0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    return (2 * new_tokens * linear + 2 * min(logit_tokens, new_tokens) * head_params
            + config.num_hidden_layers * 4 * new_tokens * (context_length + new_tokens) * width)


def causal_lm_extend_flops(model, context_length: int, new_tokens: int, num_steps: int | None = None) -> int:
    """FLOPs of feeding `new_tokens` tokens one at a time after `context_length` cached ones (decoding, each with
    its logits): what a chain costs to extend a prefix whose keys and values are already cached."""
    return sum(causal_lm_forward_flops(model, 1, context_length + i, 1, num_steps) for i in range(new_tokens))


def causal_lm_generation_flops(model, prompt_length: int, new_tokens: int, num_steps: int | None = None) -> int:
    """FLOPs of generating `new_tokens` tokens after a prompt with a KV cache, for any transformers causal LM: one
    prefill of the prompt that yields the first token, then one single-token forward for each further token
    (a RecurrentLM at `num_steps`, default mean_recurrence, every token at that depth).
    Tokens inserted rather than sampled (delimiters, "Wait") cost what generated ones do: each is fed once."""
    if new_tokens <= 0:
        return 0
    return (causal_lm_forward_flops(model, prompt_length, 0, 1, num_steps)
            + causal_lm_extend_flops(model, prompt_length, new_tokens - 1, num_steps))
