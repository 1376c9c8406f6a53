"""recurrent-lm: recurrent-depth ("looped") language models that reason in latent space."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .cache import RecurrentCache
from .config import RecurrentConfig
from .flops import FlopCount, forward_flops
from .depth import StepCounts, sample_num_steps
from .model import RecurrentLM, RecurrentLMOutput
from .tokenization import RecurrentCharacterTokenizer, character_tokenizer

AutoConfig.register(RecurrentConfig.model_type, RecurrentConfig, exist_ok=True)
AutoModelForCausalLM.register(RecurrentConfig, RecurrentLM, exist_ok=True)
AutoTokenizer.register(RecurrentConfig, fast_tokenizer_class=RecurrentCharacterTokenizer, exist_ok=True)

__all__ = ["FlopCount", "RecurrentCache", "RecurrentCharacterTokenizer", "RecurrentConfig", "RecurrentLM",
           "RecurrentLMOutput", "StepCounts", "character_tokenizer", "forward_flops", "sample_num_steps"]
