"""The demo checkpoints that ship with recurrent-lm (installed as recurrent_lm.checkpoints), each a transformers
model directory with a manifest.json saying how it was made; `rlm demo` evaluates them."""
