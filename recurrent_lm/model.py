"""A recurrent-depth ("looped") language model, Huginn-0125's layout, as a Hugging Face causal LM.

    tokens -> embedding * sqrt(d) -> prelude blocks -> e
    s_0 = random (or zero, or given) latent state
    s_t = core_blocks(adapter([s_{t-1}, e]))              for t = 1 .. r
    logits = head(norm(coda_blocks(norm(s_r))))

r ("num_steps") is chosen per call: at training time it is drawn at random so the model learns to use any depth,
and at test time it is the knob that trades compute for accuracy. Read top to bottom: norms, rotary positions,
attention, MLP, the sandwich block, then the model (recurrent_lm.depth resolves and draws r).
"""

import functools
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .active import ActiveSet
from .adaptive import AdaptiveExit
from .cache import CACHE_NAME, RecurrentCache, resolve_cache_argument
from .config import RecurrentConfig
from .depth import StepCounts, resolve_num_steps
from .generation import GenerateDepthOutput, check_generation_args, speculative_generate, steps_per_generated_token
from .tokenization import RecurrentCharacterTokenizer


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (low-precision squares overflow), cast back before the gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight
        # without autograd: the mean square from one reduction, then two products in place (a CPU spends as long
        # allocating a fresh activation as computing it; F.rms_norm's steps each allocate one)
        x32 = x.float()
        inv_rms = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(self.eps).rsqrt_()
        return (x32 * inv_rms).type_as(x).mul_(self.weight)


def rope_angles(position_ids: Tensor, head_dim: int, theta: float, scaling: dict | None = None) -> Tensor:
    """The rotation of every channel pair at every position, a complex64 tensor (batch, 1, seq, head_dim / 2) of
    unit numbers e^(i * position * freq), shaped to broadcast over heads: apply_rope is one complex product."""
    inv_freq = rope_frequencies(head_dim, theta, scaling).to(position_ids.device)
    angles = position_ids.float()[:, None, :, None] * inv_freq
    return torch.polar(torch.ones_like(angles), angles)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> Tensor:
    """RoPE's inverse frequencies theta^(-2i / head_dim), float32, with a pretrained source's scaling (config
    rope_scaling): "linear" divides every frequency by the factor; "llama3" divides only the low frequencies
    (wavelengths longer than original_max_position_embeddings / low_freq_factor), keeps the high ones, and blends
    the band between (Llama 3.1's long-context rule)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(between, blended, scaled)


def apply_rope(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate ADJACENT channel pairs (2i, 2i+1) of each head by the pair's angle, as Huginn does (Llama rotates the
    two halves; recurrent_lm.retrofit reorders a Llama's query and key rows to match), in float32: each pair read as
    the complex number e + i o and multiplied by its rotation (one kernel; a real-valued formula's swap and three
    products cost ten times as much on a CPU). Under torch.compile the product runs as an eager kernel inside the
    graph (inductor generates no complex code), with no graph break."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal self-attention through torch SDPA, with a fused qkv projection, grouped-query attention when there are
    fewer key/value heads than query heads (their cache entries are that much smaller), an optional bias on the
    projection (Qwen2) and an optional qk bias (Huginn)."""

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        self.num_heads, self.kv_heads, head_dim = config.num_attention_heads, config.kv_heads, config.head_dim
        self.split = [self.num_heads * head_dim, self.kv_heads * head_dim, self.kv_heads * head_dim]
        self.qkv = nn.Linear(config.hidden_size, sum(self.split), bias=config.attention_bias)
        self.qk_bias = nn.Parameter(torch.zeros(2, config.num_attention_heads, 1, config.head_dim)) if config.qk_bias else None
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.proj.is_residual_output = True  # scaled down at init, see RecurrentPreTrainedModel._init_weights
        self.log_scale = config.attention_log_scale

    def projection_bias(self) -> Tensor | None:
        """The qkv projection's bias with the qk bias folded in: adding a per-head, per-channel bias to q and k
        after the projection is adding it to the projection's output, which the matmul does for free."""
        if self.qk_bias is None:
            return self.qkv.bias
        q_bias, k_bias = self.qk_bias.flatten(1)  # a qk bias implies one key/value head per query head (config)
        folded = torch.cat([q_bias, k_bias, q_bias.new_zeros(self.split[2])])
        return folded if self.qkv.bias is None else folded + self.qkv.bias

    def forward(self, x: Tensor, rope: Tensor | None, mask: Tensor | None, cache=None, cache_key=None,
                active: ActiveSet | None = None) -> Tensor:
        q, k, v = F.linear(x, self.qkv.weight, self.projection_bias()).split(self.split, dim=-1)
        # b s (h d) -> b h s d, as views (einops' parsing costs more than a decode step's attention)
        q = q.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k, v = (t.unflatten(-1, (self.kv_heads, -1)).transpose(1, 2) for t in (k, v))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:  # keys and values of earlier tokens at this (layer, step), plus these
            k, v = cache.update(k, v, cache_key, active)
        if active is not None:  # x packs the running positions: each query goes back to its row, to see its keys
            q = active.to_rows(q[0].transpose(0, 1)).transpose(1, 2)  # h n d -> n h d -> b w h d -> b h w d
            mask = active.mask
        # mask None means plain causal attention over q (no padding, nothing cached) or one query seeing everything
        if self.log_scale:
            q = q * visible_keys(mask, q.shape[2], k.shape[2], q.device).log().to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                           enable_gqa=self.kv_heads != self.num_heads)
        if active is None:
            return self.proj(y.transpose(1, 2).flatten(2))  # b h s d -> b s (h d)
        return self.proj(active.from_rows(y.transpose(1, 2).flatten(2))[None])  # b h w d -> b w (h d), packed again


class GatedMLP(nn.Module):
    """SiLU-gated MLP with one fused input projection: silu(a) * b, where [a, b] = fc(x)."""

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.proj.is_residual_output = True

    def forward(self, x: Tensor) -> Tensor:
        # the two halves as two products of the fused weight's row blocks: contiguous outputs, and the same time
        gate, up = (F.linear(x, half) for half in self.fc.weight.chunk(2, dim=0))
        if torch.is_grad_enabled():
            return self.proj(F.silu(gate) * up)
        return self.proj(F.silu(gate, inplace=True).mul_(up))  # in place where autograd keeps nothing


class SandwichBlock(nn.Module):
    """x = norm(attn(norm(x)) + x); x = norm(mlp(norm(x)) + x). Normalising after each residual add keeps the
    state's scale fixed however many times the core is applied, which is what makes deep unrolling stable."""

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        eps = config.rms_norm_eps
        self.attn_in_norm, self.attn_out_norm = RMSNorm(config.hidden_size, eps), RMSNorm(config.hidden_size, eps)
        self.mlp_in_norm, self.mlp_out_norm = RMSNorm(config.hidden_size, eps), RMSNorm(config.hidden_size, eps)
        self.attn = Attention(config)
        self.mlp = GatedMLP(config)

    def forward(self, x: Tensor, rope, mask, cache=None, cache_key=None, active=None) -> Tensor:
        x = self.attn_out_norm(self.attn(self.attn_in_norm(x), rope, mask, cache, cache_key, active) + x)
        return self.mlp_out_norm(self.mlp(self.mlp_in_norm(x)) + x)


class PreNormBlock(nn.Module):
    """x = x + attn(norm(x)); x = x + mlp(norm(x)): the Llama-family decoder layer, for models retrofitted from
    pretrained transformers (recurrent_lm.retrofit), whose layers keep computing what they learned."""

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        eps = config.rms_norm_eps
        self.attn_in_norm, self.mlp_in_norm = RMSNorm(config.hidden_size, eps), RMSNorm(config.hidden_size, eps)
        self.attn = Attention(config)
        self.mlp = GatedMLP(config)

    def forward(self, x: Tensor, rope, mask, cache=None, cache_key=None, active=None) -> Tensor:
        x = x + self.attn(self.attn_in_norm(x), rope, mask, cache, cache_key, active)
        return x + self.mlp(self.mlp_in_norm(x))


BLOCKS = {"sandwich": SandwichBlock, "pre_norm": PreNormBlock}  # config.block_type -> block class


def blocks(config: RecurrentConfig, count: int) -> nn.ModuleList:
    return nn.ModuleList(BLOCKS[config.block_type](config) for _ in range(count))


@dataclass
class RecurrentLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus what is particular to a recurrent-depth model.

    latent_state: the core's final state (before the shared norm), e.g. to warm-start the next token.
    latent_states: the state after every core step, if output_latent_states.
    step_logits: the logits the coda gives after every step ("logit lens"), if output_step_logits.
    num_steps: the (without gradient, with gradient) step counts this call ran.
    steps_used: (batch, seq) core steps each position ran (fewer than num_steps where it exited early).
    """

    latent_state: Tensor | None = None
    latent_states: tuple[Tensor, ...] | None = None
    step_logits: tuple[Tensor, ...] | None = None
    num_steps: StepCounts | None = None
    steps_used: Tensor | None = None


class RecurrentPreTrainedModel(PreTrainedModel):
    config_class = RecurrentConfig
    config: RecurrentConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["SandwichBlock", "PreNormBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, with weight files as readable as the user's umask makes new files (some
        transformers releases write them through a private temporary file, mode 0600)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        umask = os.umask(0)
        os.umask(umask)
        for path in Path(save_directory).glob("*.safetensors"):
            path.chmod(0o666 & ~umask)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal "small init" of std sqrt(2 / 5d); output projections of the blocks are scaled by
        1 / sqrt(2 * effective depth) so the residual stream does not grow with depth (Huginn's "takase")."""
        std = self.config.base_std
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_output", False):
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, Attention) and module.qk_bias is not None:
            init.zeros_(module.qk_bias)


class ExitGate(nn.Module):
    """A learned exit rule (as Ouro's exit gate): from a position's latent state after a step, the logit that its
    prediction has settled, i.e. that more steps would not change the next-token argmax. A small MLP on the
    normalised state, far cheaper than a core step; trained on a frozen model (train/module.py, objective
    "exit_gate") and read by the "gate" exit criterion (recurrent_lm.adaptive)."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.fc = nn.Linear(hidden, width)
        self.out = nn.Linear(width, 1)

    def forward(self, state: Tensor) -> Tensor:
        return self.out(F.gelu(self.fc(F.layer_norm(state, state.shape[-1:])))).squeeze(-1)


class RecurrentLM(RecurrentPreTrainedModel, GenerationMixin):
    """Recurrent-depth causal LM. See the module docstring for the data flow and `forward` for the arguments."""

    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}

    def __init__(self, config: RecurrentConfig):
        super().__init__(config)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.prelude = blocks(config, config.num_prelude_layers)
        self.adapter = nn.Linear(2 * d, d, bias=False)  # input injection: [state, embedded input] -> state
        self.core = blocks(config, config.num_core_layers)
        self.coda = blocks(config, config.num_coda_layers)
        self.norm = RMSNorm(d, config.rms_norm_eps)  # shared: after the core (if latent_norm) and after the coda
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.exit_gate = ExitGate(d, config.exit_gate_width) if config.exit_gate_width else None
        self.abacus = nn.Embedding(config.abacus_positions, d) if config.abacus_positions else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def initial_state(self, like: Tensor, init_scale: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """s_0: truncated normal of std sqrt(2/5d) * init_scale cut at 3 std (times the embedding scale); zeros if
        init_scale is 0. The noise is why two calls differ; pass a seeded generator to make them repeat.

        Drawn by rejection, twice: a value beyond 3 std (0.27%) is drawn again, and one beyond again (a fraction
        7e-6) is clamped. torch's trunc_normal_ (inverse CDF through erfinv) costs 5x as much on a CPU, about 6% of
        a shallow forward; no host sync either way."""
        scale = self.config.init_scale if init_scale is None else init_scale
        std = self.config.base_std * scale
        if std <= 0:
            return torch.zeros_like(like)
        draw = functools.partial(torch.randn, like.shape, dtype=like.dtype, device=like.device, generator=generator)
        state = draw()
        state = torch.where(state.abs() > 3, draw().clamp_(-3, 3), state)
        return state.mul_(std * self.config.embedding_scale)

    # --- the three stages ------------------------------------------------------------------------------------------

    def abacus_ids(self, input_ids: Tensor) -> Tensor:
        """(batch, seq) Abacus positions of a whole sequence: 1 + the place of each counted token in its run of
        counted tokens (config.abacus_token_ids), 0 for any other token."""
        counted = torch.isin(input_ids, torch.tensor(self.config.abacus_token_ids, device=input_ids.device)).long()
        total = counted.cumsum(-1)
        run_start = (total * (1 - counted)).cummax(-1).values  # the count at the last uncounted token
        return (total - run_start) * counted

    def run_prelude(self, input_ids: Tensor, rope, mask, cache=None, abacus_ids: Tensor | None = None) -> Tensor:
        """Token embedding (times sqrt(d)), plus the Abacus positions where the model has them, and the prelude
        blocks: e, the input every core step re-injects."""
        x = self.embed_tokens(input_ids)
        if self.abacus is not None:
            x = x + self.abacus(abacus_ids)
        x = x * self.config.embedding_scale
        for i, block in enumerate(self.prelude):
            x = block(x, rope, mask, cache, ("prelude", i))
        return x

    def inject(self, embedded: Tensor) -> Tensor:
        """The prelude's half of the adapter, adapter([s, e]) = W_s s + W_e e: W_e e is the same at every step, so
        it is computed once per forward instead of once per step."""
        return F.linear(embedded, self.adapter.weight[:, self.config.hidden_size:])

    def core_step(self, state: Tensor, injected: Tensor | None, step: int, rope, mask, cache=None,
                  active: ActiveSet | None = None) -> Tensor:
        """One recurrence: input injection (the state's half of the adapter plus the precomputed prelude half),
        then the core blocks; injected None feeds `state` to the blocks as it is (the first step under
        config.skip_first_injection, where `state` is the prelude's output). With `active`, state, injected and
        rope hold the running positions only, packed (recurrent_lm.active), and the cache supplies the others'
        latest keys and values."""
        x = state if injected is None else F.linear(state, self.adapter.weight[:, : self.config.hidden_size]) + injected
        for i, block in enumerate(self.core):
            x = block(x, rope, mask, cache, ("core", i, step), active)
        return x

    def predict_from_latent(self, state: Tensor, rope, mask, cache=None, logits_to_keep: int = 0,
                            active: ActiveSet | None = None) -> Tensor:
        """Logits from a latent state: shared norm (if config.latent_norm) -> coda blocks -> shared norm -> LM head,
        in float32. `active` as in core_step."""
        x = self.norm(state) if self.config.latent_norm else state
        for i, block in enumerate(self.coda):
            x = block(x, rope, mask, cache, ("coda", i), active)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x).float()

    # --- forward ---------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: RecurrentCache | None = None,
        labels: Tensor | None = None,
        num_steps: int | tuple[int, int] | Tensor | None = None,
        use_cache: bool | None = None,
        initial_state: Tensor | None = None,
        init_scale: float | None = None,
        generator: torch.Generator | None = None,
        output_latent_states: bool = False,
        output_step_logits: bool = False,
        logits_to_keep: int = 0,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        min_steps: int = 1,
        position_depths: Tensor | None = None,
        abacus_ids: Tensor | None = None,
        check_inputs: bool = True,
        return_dict: bool | None = None,
        past_key_values: RecurrentCache | None = None,
        inputs_embeds: None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> RecurrentLMOutput:
        """Run the model. Every argument is named here, so a misspelt one is a TypeError, never silently ignored.

        Args:
            input_ids: (batch, seq) token ids in [0, vocab_size).
            attention_mask: (batch, past + seq), 1 for real tokens and 0 for padding (left padding). Padded keys are
                never attended to, so each row gets the logits it would get alone.
            position_ids: (batch, seq); by default counted over the real tokens of each row.
            cache: a RecurrentCache holding keys/values per (layer, recurrence step). `past_key_values` is its
                older name (transformers before 5.24); either works.
            labels: (batch, seq) targets in the transformers convention: the same ids as input_ids (they are
                shifted inside, token t predicts label t+1), with -100 at positions that take no loss.
            num_steps: core recurrences. An int r (or 0-d integer tensor) runs r steps, all with gradient when
                grad is enabled; a pair (n, k) runs n steps under no_grad, then k with gradient. None draws a
                random pair in training mode (recurrent_lm.depth.sample_num_steps, from `generator`) and means
                mean_recurrence in eval mode.
            initial_state: (batch, seq, hidden) latent state to start from instead of a random one (continuous
                chain of thought feeds the previous token's final state here).
            init_scale / generator: scale of, and random source for, the random initial state (and the training
                depth draw when num_steps is None).
            output_latent_states / output_step_logits: also return the state / the coda's logits after every step.
            logits_to_keep: if > 0, compute logits only for the last that many positions (generation).
            exit_criterion / exit_threshold / min_steps: adaptive depth per position (see recurrent_lm.adaptive):
                num_steps is then the maximum, and `steps_used` in the output says where each position stopped.
            position_depths: (batch, seq) core steps for each position, each in 1..num_steps: a position stops
                there as if it had exited (a router's choice, or a training draw of per-position depth); with an
                exit rule too, whichever comes first.
            abacus_ids: (batch, seq) positions in the Abacus table (config.abacus_positions), e.g. shifted by a
                random offset in training; by default counted from input_ids, which must then hold the whole
                sequence (generate passes them for the tokens it feeds after the prompt).
            check_inputs: check the token ids against the vocabulary, the positions against
                max_position_embeddings and the attention mask for padding, each a host sync. generate checks the
                prompt and turns them off for the tokens it feeds itself (in range by construction), so that a
                generated token's forward never waits on the device; off, an attention mask is taken as padded.
            inputs_embeds / output_attentions / output_hidden_states: transformers' standard inputs, named so that
                asking for them is a clear error: the model reads token ids, and its per-step view is
                output_latent_states / output_step_logits.
        """
        if inputs_embeds is not None:
            raise ValueError("RecurrentLM takes input_ids, not inputs_embeds")
        if output_attentions or output_hidden_states:
            raise ValueError("RecurrentLM returns no attentions or per-layer hidden states: ask for "
                             "output_latent_states or output_step_logits instead")
        config = self.config
        depth = resolve_num_steps(num_steps, config, self.training, generator)
        self._check_token_ids(input_ids, check_inputs)
        batch, seq_len = input_ids.shape
        cache = resolve_cache_argument(cache, past_key_values)
        if use_cache is None:  # a cache costs memory that grows with num_steps: only when asked for
            use_cache = cache is not None
        cache = (cache if cache is not None else RecurrentCache()) if use_cache else None
        past_len = cache.get_seq_length() if cache is not None else 0

        position_ids = self._positions(position_ids, attention_mask, batch, seq_len, past_len, input_ids.device,
                                       check_inputs)
        abacus_ids = self._abacus_ids(abacus_ids, input_ids, past_len, check_inputs)
        rotated_by = abacus_ids if config.abacus_rope else position_ids
        rope = rope_angles(rotated_by, config.head_dim, config.rope_theta, config.rope_scaling) if config.use_rope else None
        mask = attention_bias(attention_mask, seq_len, past_len, input_ids.device, scan=check_inputs,
                              window=config.attention_window)

        exit_rule = AdaptiveExit(exit_criterion, exit_threshold, min_steps) if exit_criterion is not None else None
        check_position_depths(position_depths, (batch, seq_len), depth.total)
        # a position that exits leaves its latest keys and values to the others: per-position depth keeps them in a
        # cache, a call-long one when the caller keeps none (a slot per core layer, or per step under autograd,
        # which must not see a saved tensor overwritten)
        per_position = exit_rule is not None or position_depths is not None
        kv = cache if cache is not None or not per_position else RecurrentCache(
            core_slots=None if torch.is_grad_enabled() else 1)
        if kv is not None:
            kv.begin(seq_len)
        embedded = self.run_prelude(input_ids, rope, mask, kv, abacus_ids)
        state = self._start_state(embedded, initial_state, init_scale, generator)
        padding = None  # left padding of this call's positions: under per-position depth it stops after one step
        if per_position and attention_mask is not None and not bool(attention_mask[:, past_len:].all()):
            padding = ~attention_mask[:, past_len:].bool()
        state, states, steps_used = self._recur(state, embedded, depth, rope, mask, kv, exit_rule, position_depths,
                                                padding, keep_states=output_latent_states or output_step_logits)

        step_logits = None
        if output_step_logits:  # the logit lens: decode every step, without writing the coda's cache for them
            lens_cache = kv.read_only() if kv is not None else None
            step_logits = tuple(self.predict_from_latent(s, rope, mask, lens_cache, logits_to_keep) for s in states)
        logits = self.predict_from_latent(state, rope, mask, kv, logits_to_keep)

        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                                 f"{tuple(labels.shape)}")
            if logits_to_keep:
                raise ValueError("labels need logits at every position: leave logits_to_keep at 0")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return RecurrentLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: cache},
            latent_state=state,
            latent_states=tuple(states) if output_latent_states else None,
            step_logits=step_logits,
            num_steps=depth,
            steps_used=steps_used,
        )

    def _start_state(self, embedded: Tensor, initial_state, init_scale, generator) -> Tensor:
        if initial_state is None:
            return self.initial_state(embedded, init_scale, generator)
        if initial_state.shape != embedded.shape:
            raise ValueError(f"initial_state must have shape {tuple(embedded.shape)}, got {tuple(initial_state.shape)}")
        return initial_state.to(embedded.dtype)

    def _recur(self, state, embedded, depth: StepCounts, rope, mask, cache, exit_rule, position_depths, padding,
               keep_states):
        """Unroll the core. A position stops once the exit rule says it has converged, or at its given depth
        (padding after the first step, under either): from then on its state is kept, later steps run on the
        positions still running only (packed: recurrent_lm.active) and read its latest keys and values, and the
        loop ends when no position runs. Returns (state, per-step states, steps each position ran)."""
        total = depth.total
        steps_used = torch.full(state.shape[:2], total, dtype=torch.long, device=state.device)
        tracker = exit_rule.tracker(self.exit_gate) if exit_rule is not None else None
        lens_cache = cache.read_only() if tracker is not None and exit_rule.needs_logits else None
        active, states, injected = None, [], {}  # active None: every position runs
        for step in range(total):
            with torch.set_grad_enabled(torch.is_grad_enabled() and step >= depth.no_grad):
                grad = torch.is_grad_enabled()
                if grad not in injected:  # computed once per grad mode: no-grad steps build no graph
                    injected[grad] = self.inject(embedded)
                # under skip_first_injection the prelude's output goes to the first step as it is
                first = step == 0 and self.config.skip_first_injection
                state = self._step(state, embedded if first else state, None if first else injected[grad], step,
                                   rope, mask, cache, active)
            if keep_states:  # otherwise let each step's memory be reused
                states.append(state)
            if step + 1 == total or (tracker is None and position_depths is None):
                continue
            done = self._stops(step + 1, state, active, tracker, lens_cache, rope, mask, position_depths, padding)
            steps_used = torch.where(done & (steps_used == total), step + 1, steps_used)
            running = steps_used == total
            if not bool(running.any()):
                break
            if bool(done.any()):
                active = ActiveSet.of(running, mask, cache.get_seq_length() - state.shape[1])
        return state, states, steps_used

    def _step(self, state, source, injection, step, rope, mask, cache, active: ActiveSet | None) -> Tensor:
        """One core step of the running positions (every one when active is None); `state` with their new states."""
        if active is None:
            return self.core_step(source, injection, step, rope, mask, cache)
        new = self.core_step(active.pack(source), active.pack(injection), step, active.pack_rope(rope), None, cache,
                             active)
        return active.scatter(state, new)

    def _stops(self, step, state, active, tracker, lens_cache, rope, mask, position_depths, padding) -> Tensor:
        """(batch, seq): the running positions that stop after `step` (1-based): at their given depth, where the
        exit rule says they have converged (the logit rules decode the running positions through the coda), and
        padding."""
        done = torch.zeros(state.shape[:2], dtype=torch.bool, device=state.device)
        if position_depths is not None:
            done = position_depths == step
        if tracker is not None:
            running = state if active is None else active.pack(state)
            logits = None
            if tracker.rule.needs_logits:
                logits = self.predict_from_latent(running, rope if active is None else active.pack_rope(rope),
                                                  mask if active is None else None, lens_cache, active=active)
            done = done | tracker.converged(step, running, logits, active)
        return done if padding is None else done | padding

    # --- generation ------------------------------------------------------------------------------------------------
    # transformers' generate drives forward through two hooks: prepare_inputs_for_generation builds each call's
    # inputs, and _update_model_kwargs_for_generation carries state from one call to the next. Both are the
    # library's intended extension points for custom models; what a recurrent-depth model carries between tokens
    # (the steps each token ran, the latent state for continuous chain of thought) travels through them, never
    # through the cache.

    @torch.no_grad()
    def generate(self, inputs: Tensor | None = None, generation_config=None, *, num_steps=None,
                 exit_criterion: str | None = None, exit_threshold: float | None = None, min_steps: int = 1,
                 continuous_cot: bool = False, draft_steps: int | None = None, draft_length: int = 4,
                 core_slots: int | None = None, prompt_num_steps: int | None = None,
                 cache: RecurrentCache | None = None, past_key_values=None, **kwargs):
        """transformers' generate (greedy, sampling, left-padded batches, streamers, stopping criteria) with depth
        control per generated token:

        num_steps: core steps per token (the maximum, with adaptive exit); default mean_recurrence.
        exit_criterion / exit_threshold / min_steps: adaptive exit, see recurrent_lm.adaptive.
        continuous_cot: warm-start each new token from the previous token's final latent state.
        draft_steps / draft_length: self-speculative decoding (greedy only): draft draft_length tokens at
            draft_steps, verify them in one forward at num_steps.
        core_slots: bounded cache memory, a ring of that many slots per core layer (see recurrent_lm.cache).
        prompt_num_steps: the prompt's forward pass runs exactly this many core steps at every position, without
            adaptive exit (the Huginn reference's do_not_exit_in_prefill, at a depth of its own); the generated
            tokens then run num_steps, or exit adaptively up to it. A prompt position that exits early leaves the
            later steps of every token after it without its state, which the model never saw in training.
        cache (or past_key_values): a RecurrentCache to continue from and fill; a new one by default.
        Other keyword arguments go to transformers' generate or to forward (init_scale, generator, ...).
        With return_dict_in_generate=True the output also has `steps_per_token` (batch, generated tokens).
        """
        inputs = kwargs.pop("input_ids", None) if inputs is None else inputs
        config = generation_config or self.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        max_length = kwargs.get("max_length", config.max_length)
        if max_new_tokens is None and max_length is not None:
            max_new_tokens = max_length - inputs.shape[1]
        steps = check_generation_args(num_steps, max_new_tokens, exit_criterion, exit_threshold, min_steps,
                                      draft_steps, draft_length, self.config, prompt_num_steps)
        cache = resolve_cache_argument(cache, past_key_values)
        if cache is not None and core_slots is not None:
            raise ValueError("core_slots shapes a new cache: give core_slots or a cache, not both")
        cache = RecurrentCache(core_slots) if cache is None else cache
        if draft_steps is not None:
            if exit_criterion is not None or continuous_cot:
                raise ValueError("speculative decoding cannot be combined with adaptive exit or continuous CoT")
            if kwargs.get("do_sample", config.do_sample):
                raise ValueError("speculative decoding is greedy only: drop do_sample")
            return speculative_generate(
                self, inputs, kwargs.get("attention_mask"), num_steps=steps,
                draft_steps=draft_steps, draft_length=draft_length,
                max_new_tokens=max_new_tokens if max_new_tokens is not None else 20,  # transformers' default length
                eos_token_id=kwargs.get("eos_token_id", config.eos_token_id),
                pad_token_id=kwargs.get("pad_token_id", config.pad_token_id), init_scale=kwargs.get("init_scale"),
                generator=kwargs.get("generator"), streamer=kwargs.get("streamer"), cache=cache)
        depth_log: list[Tensor] = []  # filled by _update_model_kwargs_for_generation, one entry per forward
        mask = kwargs.get("attention_mask")
        padded = mask is not None and not bool(mask.all())  # once per generate, not once per token
        recurrence = dict(num_steps=steps, min_steps=min_steps, continuous_cot=continuous_cot, depth_log=depth_log,
                          prompt_num_steps=prompt_num_steps, padded_prompt=padded)
        if exit_criterion is not None:
            recurrence.update(exit_criterion=exit_criterion, exit_threshold=exit_threshold)
        kwargs["use_cache"] = True  # the cache is what makes recurrent decoding affordable
        out = super().generate(inputs, generation_config, **{CACHE_NAME: cache}, **recurrence, **kwargs)
        if not isinstance(out, Tensor):
            generated = out.sequences.shape[1] - inputs.shape[1]
            out = GenerateDepthOutput(**out, steps_per_token=steps_per_generated_token(depth_log, generated),
                                      prompt_steps=depth_log[0] if depth_log else None)
        return out

    def prepare_inputs_for_generation(self, input_ids: Tensor, continuous_cot: bool = False,
                                      depth_log: list | None = None, prompt_num_steps: int | None = None,
                                      padded_prompt: bool = True, **kwargs) -> dict[str, Any]:
        """transformers' own preparation (the new tokens, attention mask, cache), then exactly the arguments
        forward declares. Releases differ in the bookkeeping they add for their own models (cache_position up to
        5.23, the cache under `cache` from 5.24 on): forward's signature decides what reaches the model, not a
        list of names. A caller's misspelt argument never gets this far: generate rejects any keyword that neither
        this method nor forward declares. continuous_cot and depth_log are read by _update_model_kwargs_for_generation;
        prompt_num_steps sets the depth of the first call (the prompt, before depth_log has an entry). After the
        prompt, forward skips its input checks (host syncs; the tokens are the model's own), and without padding
        in the prompt (padded_prompt, which generate decides once) no attention mask is passed at all.
        """
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        accepted = declared_arguments(type(self).forward)
        inputs = {name: value for name, value in inputs.items() if name in accepted}
        if self.counts_abacus:  # counted over the whole sequence, for the tokens this call feeds
            inputs["abacus_ids"] = self.abacus_ids(input_ids)[:, -inputs["input_ids"].shape[1]:]
        if not padded_prompt:
            inputs.pop("attention_mask", None), inputs.pop("position_ids", None)  # both follow from the cache length
        if depth_log:  # the prompt is behind: every later token is one this generate chose
            inputs["check_inputs"] = False
        if prompt_num_steps is not None and depth_log is not None and not depth_log:
            inputs.update(num_steps=prompt_num_steps, exit_criterion=None, exit_threshold=None)
        return inputs

    def _update_model_kwargs_for_generation(self, outputs: RecurrentLMOutput, model_kwargs: dict[str, Any],
                                            *args, **kwargs) -> dict[str, Any]:
        """transformers' update between two forwards of generate (cache, attention mask, positions), plus the state
        of the recurrence: the steps each fed position ran go to the caller's depth_log, and with continuous_cot the
        last position's final latent state becomes the next token's initial state."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if model_kwargs.get("depth_log") is not None:
            model_kwargs["depth_log"].append(outputs.steps_used)
        if model_kwargs.get("continuous_cot"):
            model_kwargs["initial_state"] = outputs.latent_state[:, -1:]
        return model_kwargs

    @property
    def counts_abacus(self) -> bool:
        """Whether the model reads Abacus positions: a learned table of them, rotary positions from them, or both."""
        return self.abacus is not None or self.config.abacus_rope

    def _abacus_ids(self, abacus_ids: Tensor | None, input_ids: Tensor, past_len: int, values: bool) -> Tensor | None:
        if not self.counts_abacus:
            if abacus_ids is not None:
                raise ValueError("abacus_ids given to a model without Abacus positions (config.abacus_positions 0, "
                                 "abacus_rope false)")
            return None
        if abacus_ids is None:
            if past_len:
                raise ValueError("a model with Abacus positions continuing from a cache needs the new tokens' "
                                 "abacus_ids (counted over the whole sequence: model.abacus_ids)")
            abacus_ids = self.abacus_ids(input_ids)
        if abacus_ids.shape != input_ids.shape:
            raise ValueError(f"abacus_ids must have the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(abacus_ids.shape)}")
        if values and abacus_ids.numel():  # one host sync for both bounds
            low, high = torch.stack(abacus_ids.aminmax()).tolist()
            if low < 0:
                raise ValueError(f"abacus_ids must be >= 0, got {low}")
            if self.abacus is not None and high >= self.config.abacus_positions:
                raise ValueError(f"an Abacus position reaches {high}: the table has "
                                 f"{self.config.abacus_positions} rows (config.abacus_positions: the longest number "
                                 "plus the training offset)")
        return abacus_ids

    def _check_token_ids(self, input_ids: Tensor, values: bool = True) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got a {input_ids.dtype} tensor")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids holds no tokens: give at least one (an empty prompt still has bos)")
        if values and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)]
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})")

    def _positions(self, position_ids, attention_mask, batch, seq_len, past_len, device, values: bool = True) -> Tensor:
        if attention_mask is not None and attention_mask.shape != (batch, past_len + seq_len):
            raise ValueError(f"attention_mask must be (batch, past + seq) = {(batch, past_len + seq_len)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:  # count real tokens only, so a left-padded row starts at position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            else:
                position_ids = torch.arange(past_len, past_len + seq_len, device=device).expand(batch, -1)
        elif position_ids.ndim == 1:
            position_ids = position_ids.expand(batch, -1)
        limit = self.config.max_position_embeddings
        if past_len + seq_len > limit or (values and position_ids.numel() and int(position_ids.max()) >= limit):
            raise ValueError(f"sequence of {past_len + seq_len} tokens (positions up to "
                             f"{int(position_ids.max()) if position_ids.numel() else 0}) exceeds "
                             f"max_position_embeddings = {limit}")
        return position_ids

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained, except that a checkpoint that does not match its config (missing,
        unexpected or wrongly shaped weights) is an error instead of a silently re-initialised model."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as error:
            raise ValueError(f"checkpoint does not match its config: {error}") from error
        problems = {name: sorted(info.get(name) or []) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {name: keys for name, keys in problems.items() if keys}
        if problems:
            raise ValueError(f"checkpoint does not match its config: {problems}")
        return (model, info) if want_info else model


def check_position_depths(depths: Tensor | None, shape: tuple[int, int], total: int) -> None:
    if depths is None:
        return
    if tuple(depths.shape) != shape or depths.dtype.is_floating_point or depths.dtype == torch.bool:
        raise ValueError(f"position_depths must be integer steps shaped like input_ids {shape}, got "
                         f"{tuple(depths.shape)} {depths.dtype}")
    if depths.numel() and (int(depths.min()) < 1 or int(depths.max()) > total):
        raise ValueError(f"position_depths must each be in 1..{total} (num_steps), got {int(depths.min())}.."
                         f"{int(depths.max())}")


@functools.cache
def declared_arguments(function) -> frozenset[str]:
    """The parameter names of a function, read once (generation asks for forward's at every token)."""
    return frozenset(inspect.signature(function).parameters)


def visible_keys(mask: Tensor | None, q_len: int, k_len: int, device) -> Tensor:
    """How many keys each query may attend to, (batch or 1, 1, q, 1) float: the True entries of an SDPA mask's
    row, or, without one (plain causal attention), the query's place among the keys."""
    if mask is not None:
        return mask.sum(-1, keepdim=True, dtype=torch.float32)
    return torch.arange(k_len - q_len + 1, k_len + 1, device=device, dtype=torch.float32)[:, None]


def attention_bias(attention_mask: Tensor | None, q_len: int, past_len: int, device, scan: bool = True,
                   window: int | None = None) -> Tensor | None:
    """Boolean SDPA mask (batch, 1, q, past + q), True = may attend; None where plain causal attention is exact.

    Padded keys are masked out. A padded query still sees itself, so no row is empty (an all-False row makes SDPA
    return NaN); its output is garbage that no real token ever reads. scan=False takes a given mask as padded
    without looking (looking is a host sync). `window`: a query sees only itself and the window - 1 tokens before
    it (config.attention_window).
    """
    padded = attention_mask is not None and (not scan or not bool(attention_mask.all()))
    if not padded and window is None and (past_len == 0 or q_len == 1):
        return None
    q_pos = torch.arange(past_len, past_len + q_len, device=device)[:, None]
    k_pos = torch.arange(past_len + q_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None]
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)[None]
    if padded:
        allowed = (allowed & attention_mask.bool()[:, None, :]) | (k_pos == q_pos)[None]
    return allowed[:, None]


# `AutoConfig` / `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(dir)` read a RecurrentLM directory once this
# module is imported (`from recurrent_lm import RecurrentLM`, or any public name of the package)
AutoConfig.register(RecurrentConfig.model_type, RecurrentConfig, exist_ok=True)
AutoModelForCausalLM.register(RecurrentConfig, RecurrentLM, exist_ok=True)
AutoTokenizer.register(RecurrentConfig, fast_tokenizer_class=RecurrentCharacterTokenizer, exist_ok=True)
