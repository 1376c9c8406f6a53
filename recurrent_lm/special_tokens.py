"""The special tokens every tokenizer of the project has, and the task renderings use (a leaf module)."""

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
THINK_START, THINK_END = "<think>", "</think>"
SPECIAL_TOKENS = (PAD, BOS, EOS, THINK_START, THINK_END)

# A process reward model of this project is a causal LM that reads a step tag after every step and predicts the good
# or the bad token there (Math-Shepherd's convention, arXiv 2312.08935); plain characters, outside the tasks' texts.
STEP_TAG, GOOD_STEP, BAD_STEP = "#", "+", "-"

# Token-conditional control (s1): a chain-of-thought prompt may state its thinking budget, "[48]" before <think>.
BUDGET_OPEN, BUDGET_CLOSE = "[", "]"
BUDGET_ALPHABET = BUDGET_OPEN + BUDGET_CLOSE + "0123456789"
