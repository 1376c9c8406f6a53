"""The special tokens every tokenizer of the project has, and the task renderings use (a leaf module)."""

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
THINK_START, THINK_END = "<think>", "</think>"
SPECIAL_TOKENS = (PAD, BOS, EOS, THINK_START, THINK_END)

# A process reward model of this project is a causal LM that reads a step tag after every step and predicts the good
# or the bad token there (Math-Shepherd's convention, arXiv 2312.08935); plain characters, outside the tasks' texts.
STEP_TAG, GOOD_STEP, BAD_STEP = "#", "+", "-"
