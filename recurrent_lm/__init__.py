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

# The public names load on first use (PEP 562), so that `rlm --help` and the light commands start without torch;
# importing the model (any of these names) registers it with transformers' Auto classes (recurrent_lm.model).
_EXPORTS = {
    "FlopCount": "flops", "forward_flops": "flops",
    "RecurrentCache": "cache",
    "RecurrentConfig": "config",
    "StepCounts": "depth", "sample_num_steps": "depth",
    "RecurrentLM": "model", "RecurrentLMOutput": "model",
    "RecurrentCharacterTokenizer": "tokenization", "character_tokenizer": "tokenization",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    importlib.import_module(f"{__name__}.model")  # the Auto classes know the model before any name is used
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
