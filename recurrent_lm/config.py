"""Configuration of a recurrent-depth language model.

The layout is Huginn-0125's (Geiping et al. 2025): a prelude of transformer blocks embeds the input, a recurrent
core of blocks is applied r times with the prelude's output injected at every step, and a coda decodes. The
defaults are Huginn-0125's own shape; PRESETS names every shape the project uses ("debug" for tests, "demo",
"100m", "huginn-0125"), `RecurrentConfig.preset("debug", vocab_size=48)` builds one.
"""

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, get_args

import torch
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import PreTrainedConfig


class ConfigFieldError(ValueError):
    """A missing, ill-typed or out-of-range field of a RecurrentConfig, in one line that names the field and where the
    value came from: "RecurrentConfig" when built in Python, the config.json it was read from otherwise."""

    def __init__(self, field: str, problem: str, source: str | os.PathLike = "RecurrentConfig"):
        self.field, self.problem = field, problem
        super().__init__(f"{source}: field {field!r}: {problem}")

    def read_from(self, source: str | os.PathLike) -> "ConfigFieldError":
        return ConfigFieldError(self.field, self.problem, source)


def one_line_errors(cls: type) -> type:
    """@strict reports a bad value as a two-line StrictDataclassError, which is no ValueError (so `rlm` would print
    a traceback): re-raise it as the one-line ConfigFieldError naming the field. An int given for a float field (JSON
    and YAML write 10000 for 10000.0) is taken as that float."""
    strict_setattr, strict_validate = cls.__setattr__, cls.validate

    def __setattr__(self, name: str, value: Any) -> None:
        declared = declared_type(cls, name)
        if type(value) is int and (declared is float or float in get_args(declared)):
            value = float(value)
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError:
            raise ConfigFieldError(name, f"{name} expected {type_name(declared)}, got {type(value).__name__} "
                                         f"{value!r}") from None

    @functools.wraps(strict_validate)  # keeps the marker by which @strict recognises its own validate
    def validate(self) -> None:
        try:
            strict_validate(self)
        except StrictDataclassClassValidationError as error:
            raise error.__cause__ from None  # validate_architecture's ConfigFieldError, or transformers' ValueError

    cls.__setattr__, cls.validate = __setattr__, validate
    return cls


def declared_type(cls: type, name: str) -> Any:
    field = cls.__dataclass_fields__.get(name)
    return field.type if field is not None else Any


def type_name(declared: Any) -> str:
    return declared.__name__ if isinstance(declared, type) else str(declared).replace("typing.", "")


def check_finite(field: str, value: Any, minimum: float, *, allow_minimum: bool, label: str | None = None) -> None:
    """A finite real number above `minimum` (or equal to it, if allowed); NaN fails every comparison, so a plain
    `value <= minimum` test would let it through."""
    is_real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_real and math.isfinite(value) and (value >= minimum if allow_minimum else value > minimum)):
        relation = ">=" if allow_minimum else ">"
        raise ConfigFieldError(field, f"{label or field} must be a finite number {relation} {minimum:g}, got {value!r}")


def read_config_json(file: Path) -> dict[str, Any]:
    """The object a config.json holds; a file that does not parse (empty, truncated, binary) or holds no JSON object
    is a one-line ValueError naming it."""
    try:
        config = json.loads(file.read_bytes())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON (line {error.lineno} column {error.colno}: {error.msg})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{file} is not valid JSON (byte {error.start} is not text: {error.reason})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} is not valid config JSON: it holds a {type(config).__name__}, not an object")
    return config


def config_file(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    return path / "config.json" if path.is_dir() else path


@one_line_errors
@strict
class RecurrentConfig(PreTrainedConfig):
    r"""Configuration of [`RecurrentLM`].

    Args:
        vocab_size: number of tokens in the vocabulary (rows of the embedding and of the LM head).
        hidden_size: width d of the residual stream and of the latent state.
        num_attention_heads: attention heads per block; hidden_size must divide by it.
        intermediate_size: width of the gated SiLU MLP.
        num_prelude_layers: blocks that embed the input once per token (may be 0).
        num_core_layers: blocks of the recurrent core, applied `num_steps` times (at least 1).
        num_coda_layers: blocks that decode the final latent state (may be 0).
        mean_recurrence: mean number of core steps drawn per training forward pass, and the depth used in eval
            mode when no `num_steps` is given.
        mean_backprop_depth: steps at the end of the unrolled core that get gradients during training; earlier
            steps run without an autograd graph (truncated backpropagation). It may exceed mean_recurrence: then
            every drawn step gets gradients.
        max_position_embeddings: longest sequence (prompt plus generated tokens) the model accepts.
        rope_theta: base of the rotary position embedding.
        use_rope: rotary positions on queries and keys; False gives a position-free (NoPE) causal model.
        qk_bias: a learned bias added to queries and keys before the rotation (Huginn-0125 has one).
        rms_norm_eps: epsilon of every RMSNorm.
        scale_embeddings: multiply token embeddings (and the random initial state) by sqrt(hidden_size).
        init_scale: scale of the random initial latent state (a truncated normal of std
            sqrt(2 / (5 d)) * init_scale, cut at 3 std); 0 gives a zero, deterministic initial state.
        initializer_range: std of the weight initialisation; None means sqrt(2 / (5 d)) ("small init" of
            Nguyen & Salazar, used by Huginn), with output projections further scaled by
            1 / sqrt(2 * effective depth at mean_recurrence).
        tie_word_embeddings: share the LM head with the token embedding.
        attention_window: each query attends to itself and the attention_window - 1 tokens before it only
            (sliding-window attention); None: every earlier token. A window of 2 or 3 is the transformer's form of
            the deep-thinking networks' kernel-3 convolutions (Bansal et al. 2022): what a position knows of
            tokens further back arrives one core step at a time, so the depth a string needs grows with its
            length and one step's rule is the same at every length.
        attention_log_scale: multiply each query by log(n), n the number of keys it may attend to (Chiang &
            Cholak 2022, arXiv 2202.12172; "scalable softmax", Nakanishi 2025, arXiv 2501.19399). Softmax over n
            keys flattens as n grows, so a head that picks one key out of a trained length's worth of tokens
            picks it less surely out of a longer input's; the log n factor keeps the picked key's weight as the
            input lengthens. False (the default): the plain 1 / sqrt(head_dim).
        abacus_positions: rows of a learned table of positions counted within each number (McLeish et al. 2024's
            Abacus embeddings, arXiv 2405.17399): a token of `abacus_token_ids` gets 1 + its place in the run of
            such tokens it belongs to (the first digit of every number is 1), any other token 0, and that row is
            added to its embedding. Digits of the same significance then share a position in every operand and in
            the answer, at any length. 0: no table (the default). It must exceed the longest run plus the
            training offset (`model.abacus_offset` of rlm train).
        abacus_token_ids: the token ids that are counted (a task tokenizer's digits).
        abacus_rope: rotate queries and keys by the Abacus position (a counted token's place in its run, 0 for
            any other token) instead of the sequence position: a score then depends on the difference of two
            digits' places within their numbers ("the next digit of the other operand" is +1 at any length and
            any offset), not on how far apart they are in the text. Needs use_rope and abacus_token_ids; works
            with or without the learned table (abacus_positions).
        exit_gate_width: hidden width of a learned exit gate on the latent state (0: none). The gate estimates,
            per position and step, whether the prediction has settled; the "gate" exit criterion reads it
            (recurrent_lm.adaptive). It is trained on a frozen model (`rlm train --config demo-exit-gate`).

    Options that a model retrofitted from a pretrained Llama-family transformer sets (`rlm retrofit`,
    recurrent_lm.retrofit), so that its layers compute exactly what they computed in the source model:
        block_type: "sandwich" (Huginn: a norm before and after attention and MLP) or "pre_norm" (Llama:
            x + attn(norm(x)), then x + mlp(norm(x))).
        num_key_value_heads: key/value heads of grouped-query attention (None: one per attention head).
        attention_bias: a bias on the query, key and value projections (Qwen2).
        rope_scaling: the source's RoPE frequency scaling, {"rope_type": "linear", "factor": F} or Llama 3's
            {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}; None: plain RoPE.
        latent_norm: the shared norm applied to the core's output before the coda (Huginn). A retrofitted
            pre-norm stack has no norm there (its only norm is the final one), so it sets this to False.
        skip_first_injection: the first core step reads the prelude's output directly instead of
            adapter([s_0, e]) (the retrofitting recipe's "skip-adapter" start: no noise, no adapter at step 1), so
            one step is exactly the source model's layer stack whatever the adapter's weights.
    """

    model_type: ClassVar[str] = "recurrent_lm"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache", "past_key_values"]

    vocab_size: int = 65536
    hidden_size: int = 5280
    num_attention_heads: int = 55
    intermediate_size: int = 17920
    num_prelude_layers: int = 2
    num_core_layers: int = 4
    num_coda_layers: int = 2
    mean_recurrence: int = 32
    mean_backprop_depth: int = 8
    max_position_embeddings: int = 4096
    rope_theta: float = 50000.0
    use_rope: bool = True
    qk_bias: bool = True
    rms_norm_eps: float = 1e-6
    scale_embeddings: bool = True
    init_scale: float = 1.0
    initializer_range: float | None = None
    tie_word_embeddings: bool = True
    exit_gate_width: int = 0
    attention_window: int | None = None
    attention_log_scale: bool = False
    abacus_positions: int = 0
    abacus_token_ids: list[int] | None = None
    abacus_rope: bool = False
    block_type: str = "sandwich"
    num_key_value_heads: int | None = None
    attention_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    latent_norm: bool = True
    skip_first_injection: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def num_hidden_layers(self) -> int:
        """Effective depth at mean_recurrence: prelude + core * mean_recurrence + coda."""
        return self.effective_depth(self.mean_recurrence)

    def effective_depth(self, num_steps: int) -> int:
        return self.num_prelude_layers + self.num_core_layers * num_steps + self.num_coda_layers

    @property
    def embedding_scale(self) -> float:
        return math.sqrt(self.hidden_size) if self.scale_embeddings else 1.0

    @property
    def base_std(self) -> float:
        """Std of the weights and of the random initial state: sqrt(2 / (5 d)) unless initializer_range is set."""
        return self.initializer_range if self.initializer_range is not None else math.sqrt(2 / (5 * self.hidden_size))

    def validate_architecture(self):
        """Called by @strict on construction, after it has checked every field's type: each invalid value is a
        ConfigFieldError (a ValueError) naming the field."""
        for name in AT_LEAST_ONE:
            if getattr(self, name) < 1:
                why = " (a recurrent-depth model needs a core)" if name == "num_core_layers" else ""
                raise ConfigFieldError(name, f"{name} must be at least 1, got {getattr(self, name)}{why}")
        if self.attention_window is not None and self.attention_window < 1:
            raise ConfigFieldError("attention_window", f"attention_window must be >= 1 (a query sees itself), got "
                                   f"{self.attention_window}")
        if (self.abacus_positions or self.abacus_rope) and not self.abacus_token_ids:
            raise ConfigFieldError("abacus_token_ids", "Abacus positions count runs of the abacus_token_ids: give "
                                   "them (e.g. the ids of the digits)")
        if self.abacus_rope and not self.use_rope:
            raise ConfigFieldError("abacus_rope", "abacus_rope rotates by the Abacus positions: it needs "
                                   "use_rope: true")
        for name in ("num_prelude_layers", "num_coda_layers", "exit_gate_width", "abacus_positions"):
            if getattr(self, name) < 0:
                raise ConfigFieldError(name, f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigFieldError("num_attention_heads", f"hidden_size ({self.hidden_size}) is not divisible by "
                                   f"num_attention_heads ({self.num_attention_heads})")
        if self.use_rope and self.head_dim % 2:
            raise ConfigFieldError("num_attention_heads", f"RoPE rotates pairs of channels: head_dim = hidden_size / "
                                   f"num_attention_heads must be even, got {self.head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            check_finite(name, getattr(self, name), 0, allow_minimum=False)
        check_finite("init_scale", self.init_scale, 0, allow_minimum=True)
        if self.initializer_range is not None:
            check_finite("initializer_range", self.initializer_range, 0, allow_minimum=False)
        if self.block_type not in BLOCK_TYPES:
            raise ConfigFieldError("block_type", f"block_type must be one of {', '.join(BLOCK_TYPES)}, got "
                                   f"{self.block_type!r}")
        if self.num_key_value_heads is not None and (self.num_key_value_heads < 1
                                                     or self.num_attention_heads % self.num_key_value_heads):
            raise ConfigFieldError("num_key_value_heads", f"num_key_value_heads ({self.num_key_value_heads}) must be "
                                   f">= 1 and divide num_attention_heads ({self.num_attention_heads})")
        if self.qk_bias and self.kv_heads != self.num_attention_heads:
            raise ConfigFieldError("qk_bias", "qk_bias (Huginn's) needs one key/value head per attention head")
        check_rope_scaling(self.rope_scaling)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "RecurrentConfig":
        """transformers' from_pretrained, telling from_dict where the config comes from (AutoConfig does the same)."""
        kwargs.setdefault("name_or_path", str(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "RecurrentConfig":
        """transformers' from_dict. A config read from a model directory (name_or_path, passed by from_pretrained
        and AutoConfig) must give every field of the model's shape, since the defaults are Huginn-0125's 3.5B shape,
        and its errors name its config.json."""
        if not kwargs.get("name_or_path"):
            return super().from_dict(config_dict, **kwargs)
        file = config_file(kwargs["name_or_path"])
        try:
            for name in SHAPE_FIELDS:
                if name not in config_dict:
                    raise ConfigFieldError(name, f"{name} is missing (the default, {getattr(cls, name)}, is "
                                                 "Huginn-0125's, not this model's)")
            for name in ("dtype", "torch_dtype"):  # transformers would look it up in torch and fail obscurely
                value = config_dict.get(name)
                if value is not None and not isinstance(getattr(torch, str(value), None), torch.dtype):
                    raise ConfigFieldError(name, f"{name} {value!r} is not a torch dtype (e.g. float32, bfloat16)")
            return super().from_dict(config_dict, **kwargs)
        except ConfigFieldError as error:
            raise error.read_from(file) from None
        except ValueError as error:
            raise ValueError(f"{file}: {error}") from None

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        """transformers' reader, except that a file that is not a JSON object is a one-line ValueError giving the
        parser's reason (transformers' own is an OSError without it)."""
        return cls._decode_special_floats(read_config_json(Path(json_file)))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "RecurrentConfig":
        """A named shape (see PRESETS), with any field overridden: `RecurrentConfig.preset("debug", vocab_size=48)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


AT_LEAST_ONE = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "num_core_layers",
                "mean_recurrence", "mean_backprop_depth", "max_position_embeddings")
# The fields that fix a model's shape and depth: a config.json must give them all (every saved one does)
SHAPE_FIELDS = (*AT_LEAST_ONE, "num_prelude_layers", "num_coda_layers")
BLOCK_TYPES = ("sandwich", "pre_norm")
ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise ConfigFieldError("rope_scaling", f"rope_type {kind!r} is not supported; supported: "
                               f"{', '.join(ROPE_SCALINGS)} (or None for plain RoPE)")
    missing = [name for name in ROPE_SCALINGS[kind] if name not in scaling]
    if missing:
        raise ConfigFieldError("rope_scaling", f"rope_scaling of type {kind!r} lacks {', '.join(missing)}")
    for name in ROPE_SCALINGS[kind]:
        check_finite("rope_scaling", scaling[name], 0, allow_minimum=False, label=f"rope_scaling[{name!r}]")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:  # llama3 divides by the gap
        raise ConfigFieldError("rope_scaling", f"rope_scaling's high_freq_factor ({scaling['high_freq_factor']}) must "
                               f"exceed its low_freq_factor ({scaling['low_freq_factor']})")


# The named model shapes, the one place a shape is written (recipes say `architecture: {preset: NAME, ...}` and
# override what they need, typically vocab_size for their tokenizer). Fields not given take RecurrentConfig's
# defaults, which are Huginn-0125's.
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.2M parameters: unit tests and CPU smoke runs (configs/debug.yaml)
    "debug": dict(vocab_size=256, hidden_size=64, num_attention_heads=4, intermediate_size=160,
                  num_prelude_layers=1, num_core_layers=2, num_coda_layers=1, mean_recurrence=4,
                  mean_backprop_depth=2, max_position_embeddings=256),
    # ~0.8M parameters: the demo's latent and CoT models, trained on a laptop CPU in minutes (configs/demo-*.yaml)
    "demo": dict(vocab_size=256, hidden_size=128, num_attention_heads=4, intermediate_size=320,
                 num_prelude_layers=1, num_core_layers=2, num_coda_layers=1, mean_recurrence=6,
                 mean_backprop_depth=3, max_position_embeddings=256),
    # ~83M parameters: a first GPU pretraining run (configs/gpu-100m.yaml)
    "100m": dict(vocab_size=32768, hidden_size=768, num_attention_heads=12, intermediate_size=2048,
                 num_prelude_layers=2, num_core_layers=4, num_coda_layers=2, mean_recurrence=8,
                 mean_backprop_depth=4, max_position_embeddings=1024),
    # 3.5B: Huginn-0125 itself (Geiping et al. 2025), the defaults (configs/huginn-0125.yaml)
    "huginn-0125": {},
}
