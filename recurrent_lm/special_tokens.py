"""The special tokens every tokenizer of the project has, and the task renderings use (a leaf module)."""

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
THINK_START, THINK_END = "<think>", "</think>"
SPECIAL_TOKENS = (PAD, BOS, EOS, THINK_START, THINK_END)
