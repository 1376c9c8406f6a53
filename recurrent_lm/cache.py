"""The KV cache of a recurrent-depth model: one entry per (physical layer, recurrence step).

Step j of the core at a new token attends to the step-j keys and values of earlier tokens, so the cache is keyed
by ("prelude", layer), ("core", layer, step) and ("coda", layer). Each key owns one transformers DynamicLayer, so
transformers' own cache operations (crop, batch reordering) work unchanged, and keys appear lazily:
`generate(num_steps=R)` works for any R, where a DynamicCache pre-allocates num_hidden_layers slots and fails.

Strategies (`core_slots`), with the cache bytes per token for P prelude, C core, K coda layers, r steps, width d:
- None, "full": every step keeps its own entry; 2 * (P + C * r + K) * d values per token: memory grows with r.
- N, "ring": a fixed budget of N slots per core layer; step j reads and writes slot j mod N, so each slot holds,
  for every earlier token, its latest step congruent to j (Huginn's "compress-sN"). 2 * (P + C * min(r, N) + K)
  * d values per token, whatever r is. N = 1 keeps only each token's last step.

Substitutes: a token that did not compute step j (it exited early, or was generated at a smaller depth) has no
step-j entry of its own. A later token's step j then reads that token's latest computed step (the previous
slot's entry; Huginn's "latest" lookup). The same holds inside a forward call: once a position has exited, the
core runs on the positions still running only (recurrent_lm.active), and `update` stores, for every other
position, its latest computed entries.

The cache holds keys and values only. What else decoding carries from one token to the next (the latent state
for continuous chain of thought, the steps each token ran) travels through the model's outputs and generate's
model kwargs, as transformers' own stateful models do.
"""

from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .depth import check_count

if TYPE_CHECKING:
    from .active import ActiveSet

# transformers 5.24 renamed the cache argument of forward and generate, and the cache field of model outputs, from
# `past_key_values` to `cache`. Detect the installed convention from the outputs' fields rather than from a version
# number, so that every 5.x release is served by the name its own generation loop uses.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def resolve_cache_argument(cache, past_key_values):
    """The cache a caller passed under either name (`cache`, or the older `past_key_values`)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as cache= (past_key_values= is its older name)")
    return cache if cache is not None else past_key_values


class RecurrentCache(Cache):
    """Cache keyed by (layer, step). See the module docstring for the strategies."""

    def __init__(self, core_slots: int | None = None):
        if core_slots is not None:  # None: the full cache
            core_slots = check_count(core_slots, "core_slots")
        super().__init__(layer_class_to_replicate=DynamicLayer)
        self.core_slots = core_slots
        self.slot_of: dict[Hashable, int] = {}
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def slot(self, key: Hashable) -> Hashable:
        if self.core_slots is not None and key[0] == "core":
            return ("core", key[1], key[2] % self.core_slots)
        return key

    def _layer(self, key: Hashable) -> DynamicLayer | None:
        index = self.slot_of.get(self.slot(key))
        return None if index is None else self.layers[index]

    def _previous_step(self, key: Hashable) -> DynamicLayer | None:
        return self._layer(("core", key[1], key[2] - 1)) if key[0] == "core" and key[2] > 0 else None

    def begin(self, new_tokens: int) -> None:
        """Called once at the start of every forward call that feeds new_tokens tokens."""
        self.seen_tokens += new_tokens
        self.call_tokens = new_tokens

    def update(self, key_states: Tensor, value_states: Tensor, key: Hashable,
               active: "ActiveSet | None" = None) -> tuple[Tensor, Tensor]:
        """Store this call's keys and values at `key` and return those of every token so far, (batch, heads,
        tokens, head_dim). `active`: the states are those of the running positions only, packed (1, heads, N,
        head_dim); every other position of the call stores its latest computed step's entries (see the module
        docstring), so the returned keys and values are still every position's."""
        layer = self._layer(key)
        if layer is None:
            self.slot_of[self.slot(key)] = len(self.layers)
            layer = DynamicLayer()
            self.layers.append(layer)
        total = self.seen_tokens  # tokens including this call's
        past, have = total - (self.call_tokens if active is not None else key_states.shape[-2]), layer.get_seq_length()
        previous = self._previous_step(key)
        if active is not None:  # the latest computed entries, with the running positions' new ones written in
            key_states = written_in(previous.keys[..., past:total, :], key_states, active)
            value_states = written_in(previous.values[..., past:total, :], value_states, active)
        if have == total:  # a ring slot this call already wrote at an earlier step: overwrite this call's part
            layer.keys[..., past:, :] = key_states
            layer.values[..., past:, :] = value_states
            return layer.keys, layer.values
        if have < past:  # earlier tokens never computed this step: they contribute their latest computed step
            layer.update(previous.keys[..., have:past, :], previous.values[..., have:past, :])
        return layer.update(key_states, value_states)

    def read_only(self) -> "ReadOnlyCache":
        """A view whose update returns past + new keys/values without storing them (the logit lens decodes every
        step through the coda, but only the final step's coda entries belong in the cache)."""
        return ReadOnlyCache(self)

    def crop(self, max_length: int) -> None:
        """Keep the first max_length tokens (a negative value removes that many from the end)."""
        keep = max_length if max_length >= 0 else max(self.seen_tokens + max_length, 0)
        for layer in self.layers:
            if layer.get_seq_length() > keep:
                layer.crop(keep - layer.get_seq_length())
        self.seen_tokens = min(self.seen_tokens, keep)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))

    def bytes_per_token(self) -> float:
        tokens = self.seen_tokens * (self.layers[0].keys.shape[0] if self.layers else 0)
        return self.num_bytes() / tokens if tokens else 0.0


def written_in(latest: Tensor, packed: Tensor, active: "ActiveSet") -> Tensor:
    """A call's keys or values (batch, heads, seq, head_dim): `latest` with the running positions' new entries
    (packed (1, heads, N, head_dim)) written in."""
    latest = latest.clone()
    latest[active.batch, :, active.position] = packed[0].transpose(0, 1)
    return latest


class ReadOnlyCache:
    """The logit lens's view of a cache: update returns the cached keys/values of earlier tokens plus this call's,
    and stores nothing there. It keeps this call's latest entries per layer itself, so that a lens pass over the
    running positions only (`active`) attends to every position, the exited ones at the state they exited with."""

    def __init__(self, cache: RecurrentCache):
        self.cache = cache
        self.latest: dict[Hashable, tuple[Tensor, Tensor]] = {}

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length()

    def update(self, key_states: Tensor, value_states: Tensor, key: Hashable,
               active: "ActiveSet | None" = None) -> tuple[Tensor, Tensor]:
        if active is not None:
            latest_keys, latest_values = self.latest[key]
            key_states = written_in(latest_keys, key_states, active)
            value_states = written_in(latest_values, value_states, active)
        self.latest[key] = key_states, value_states
        layer = self.cache._layer(key)
        if layer is None or not layer.is_initialized:
            return key_states, value_states
        past = self.cache.get_seq_length() - key_states.shape[-2]
        keys, values = layer.keys[..., :past, :], layer.values[..., :past, :]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)
