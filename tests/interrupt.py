"""A Lightning callback for tests: Ctrl-C (a KeyboardInterrupt) at a given training step."""

from lightning.pytorch.callbacks import Callback


class InterruptAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt
