"""recurrent-lm: recurrent-depth ("looped") language models that reason in latent space."""

import os
import signal
import sys

if os.path.basename(sys.argv[0]) == "rlm" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # The `rlm` script imports this package (torch, transformers, Lightning: seconds) before its main() can catch
    # anything: Ctrl-C meanwhile is one line and exit 130, as later (recurrent_lm.cli.main takes over from here).
    def _interrupted_while_starting(signum, frame):
        sys.stderr.write("rlm: interrupted while starting\n")
        os._exit(130)

    signal.signal(signal.SIGINT, _interrupted_while_starting)

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
