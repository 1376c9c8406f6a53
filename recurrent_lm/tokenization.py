"""Tokenizers, built with the tokenizers library and saved as transformers fast tokenizers (AutoTokenizer loads
them). Every tokenizer here has bos, eos and pad tokens and the thinking delimiters as special tokens, and puts bos
before every text it encodes (as Llama's does), so whatever encodes text with a saved tokenizer (lm-eval,
pipelines, budget forcing, a user's own code) gets the ids the model was trained on."""

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .special_tokens import BOS, EOS, PAD, SPECIAL_TOKENS, THINK_END, THINK_START



class RecurrentCharacterTokenizer(PreTrainedTokenizerFast):
    """One token per character of a fixed alphabet. Text with a character outside it is a clear error (a plain
    WordLevel tokenizer would fail with an opaque message, or silently map it to an unknown token)."""

    def _check_alphabet(self, texts) -> None:
        alphabet = self.init_kwargs.get("alphabet")
        if not alphabet:
            return
        allowed = set(alphabet)
        for text in [texts] if isinstance(texts, str) else texts:
            if not isinstance(text, str):
                continue
            for special in self.all_special_tokens:
                text = text.replace(special, "")
            unknown = sorted(set(text) - allowed)
            if unknown:
                raise ValueError(f"text {text[:40]!r} has characters outside the tokenizer's alphabet: {unknown}")

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        self._check_alphabet(text)
        if text_pair is not None:
            self._check_alphabet(text_pair)
        return super()._encode_plus(text, text_pair, *args, **kwargs)


def bos_first(backend: Tokenizer) -> Tokenizer:
    """Make the backend tokenizer start every encoding (and each text of a pair) with bos; saved in
    tokenizer.json, so every consumer of the saved tokenizer applies it. add_special_tokens=False turns it off."""
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, backend.token_to_id(BOS))])
    return backend


def character_tokenizer(alphabet: Iterable[str]) -> "RecurrentCharacterTokenizer":
    """A character-level tokenizer: ids 0-4 are <pad> <bos> <eos> <think> </think>, then one id per character."""
    characters = sorted(set(alphabet) - set(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *characters])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # every character is its own token
    backend.decoder = decoders.Fuse()  # and decoding joins them back without spaces
    return RecurrentCharacterTokenizer(tokenizer_object=bos_first(backend), bos_token=BOS, eos_token=EOS, pad_token=PAD,
                              additional_special_tokens=[THINK_START, THINK_END], alphabet="".join(characters),
                              padding_side="left")


def train_bpe_tokenizer(files: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on text files, with the project's special tokens."""
    files = [str(f) for f in files]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"text files not found: {missing}")
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train(files, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bos_first(backend), bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[THINK_START, THINK_END], padding_side="left")
