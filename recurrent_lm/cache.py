"""The KV cache of a recurrent-depth model: one entry per (physical layer, recurrence step).

Step j of the core at a new token attends to the step-j keys and values of earlier tokens, so the cache is keyed
by ("prelude", layer), ("core", layer, step) and ("coda", layer). Each key owns one transformers DynamicLayer, so
transformers' own cache operations (crop, batch reordering for beam search) work unchanged. Keys appear lazily:
`generate(num_steps=R)` works for any R, unlike a DynamicCache that pre-allocates num_hidden_layers slots.

When a step appears for the first time after earlier tokens were cached without it, its past is a copy of the
previous step's past: every token then contributes its latest computed step (Huginn's "latest" substitute).
"""

from collections.abc import Hashable

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer


class RecurrentCache(Cache):
    def __init__(self):
        super().__init__(layer_class_to_replicate=DynamicLayer)
        self.slot_of: dict[Hashable, int] = {}

    def _layer(self, key: Hashable) -> DynamicLayer | None:
        slot = self.slot_of.get(key)
        return None if slot is None else self.layers[slot]

    def update(self, key_states: Tensor, value_states: Tensor, key: Hashable, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if key not in self.slot_of:
            self.slot_of[key] = len(self.layers)
            layer = DynamicLayer()
            self.layers.append(layer)
            earlier = self._earlier_step(key)
            # tokens cached before this forward call; the first key of every call is updated before any other
            past = self.get_seq_length() - key_states.shape[-2] if len(self.layers) > 1 else 0
            if earlier is not None and past > 0:
                layer.update(earlier.keys[..., :past, :].clone(), earlier.values[..., :past, :].clone())
        return self._layer(key).update(key_states, value_states)

    def _earlier_step(self, key: Hashable) -> DynamicLayer | None:
        if isinstance(key, tuple) and key[0] == "core" and key[2] > 0:
            return self._layer(("core", key[1], key[2] - 1))
        return None

    def read_only(self) -> "ReadOnlyCache":
        """A view whose update returns past + new keys/values without storing them (used by the logit lens)."""
        return ReadOnlyCache(self)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))


class ReadOnlyCache:
    def __init__(self, cache: RecurrentCache):
        self.cache = cache

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length()

    def update(self, key_states: Tensor, value_states: Tensor, key: Hashable) -> tuple[Tensor, Tensor]:
        layer = self.cache._layer(key) or self.cache._earlier_step(key)
        if layer is None or not layer.is_initialized:
            return key_states, value_states
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
