"""Training recipes that ship with recurrent-lm (installed as recurrent_lm.configs): `rlm train --config NAME`
names one from any directory; see recurrent_lm.recipes."""
