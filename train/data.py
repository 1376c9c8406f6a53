"""The LightningDataModule: freshly generated task problems (or packed text) for training, fixed held-out
problems for validation."""

import random
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from recurrent_lm.data import (Curriculum, TaskStream, TextStream, collate, encode_problem, encode_step_labels,
                               heldout_problems, labelled_chain, load_step_chains, set_prompt_format,
                               text_source)
from recurrent_lm.loading import load_tokenizer
from recurrent_lm.options import ranges
from recurrent_lm.special_tokens import BAD_STEP, BUDGET_ALPHABET, GOOD_STEP, STEP_TAG
from recurrent_lm.tasks import get_task, load_jsonl, task_tokenizer


@ranges("data.", batch_size=">= 1", seq_len=">= 2", min_difficulty=">= 1", max_difficulty=">= 1",
        curriculum_batches=">= 0", seed=">= 0", val_difficulties=">= 1", val_problems_per_difficulty=">= 1",
        num_workers=">= 0", step_error_rate="[0, 1]", step_chains_share="[0, 1]")
class RecurrentDataModule(L.LightningDataModule):
    """Training and validation data.

    Args:
        tasks: task names to train on (see `rlm tasks list`); each batch mixes them.
        text_files: train on packed text instead: local .txt/.jsonl/.parquet files, or one hub dataset named
            hub:NAME (needs the network; needs `tokenizer`).
        tokenizer: a tokenizer directory (or a shipped checkpoint's name: its tokenizer); by default the
            character tokenizer of the tasks.
        batch_size: sequences per batch (per device).
        seq_len: sequence length of packed text.
        min_difficulty: easiest training problems.
        max_difficulty: hardest training problems.
        curriculum_batches: the hardest difficulty grows from min to max over this many batches (0: from the
            start).
        difficulty_per_batch: every batch holds problems of one difficulty (the same on every rank), passed to the
            model as batch["difficulty"]: what model.steps_per_difficulty ties the training depth to.
        cot: render problems with a chain of thought (the CoT baseline).
        loss_on: "answer" (latent models: the answer only), "completion" (thinking + answer: CoT models) or "all".
        hints: add the tasks' dense intermediate targets (e.g. every variable's value) to the loss.
        step_labels: train a process reward model: every problem's worked chain of thought with the step tag after
            each step, one step corrupted in a share step_error_rate of them, and the good or bad token (the task's
            exact step checker) as the only labels (recurrent_lm.data.encode_step_labels). The default tokenizer
            then also holds the tag and the two label tokens.
        step_error_rate: the share of step-labelled chains with a corrupted step.
        step_chains: JSONL files of labelled chains sampled from a policy (`rlm label-steps`: exact or
            Math-Shepherd labels) to mix into step-label training.
        step_chains_share: the share of each batch drawn from step_chains (1: those chains only, as for a task
            without worked solutions).
        state_thinking_length: chain-of-thought prompts state their thinking's length in tokens ("[48]" before
            <think>), so that the model can be asked for a length at test time (s1's token-conditional control,
            `rlm compare --methods token-conditional`). The default tokenizer then also holds "[", "]" and digits.
        seed: seeds the training stream (each rank gets its own stream).
        val_difficulties: difficulties of the held-out problems (may exceed max_difficulty: extrapolation).
        val_problems_per_difficulty: held-out problems per difficulty.
        val_problems: a JSONL file of held-out problems instead of generated ones.
        num_workers: DataLoader workers generating training batches.
        prompt_format: how task problems are written: "plain" (the task's text) or "chat" (the question as the user
            turn of the tokenizer's chat template, the answer as the assistant's turn ended by its eos token: a
            pretrained chat model's own format). Saved with the exported tokenizer, so that `rlm sweep` and `rlm
            compare` prompt the model the same way. None: the tokenizer's own (plain if it records none).
    """

    def __init__(self, tasks: list[str] | None = None, text_files: list[str] | None = None, tokenizer: str | None = None,
                 batch_size: int = 32, seq_len: int = 256, min_difficulty: int = 1, max_difficulty: int = 4,
                 curriculum_batches: int = 0, cot: bool = False, loss_on: str = "answer", hints: bool = False,
                 seed: int = 0, val_difficulties: list[int] | None = None, val_problems_per_difficulty: int = 32,
                 val_problems: str | None = None, num_workers: int = 0, difficulty_per_batch: bool = False,
                 step_labels: bool = False, step_error_rate: float = 0.5, step_chains: list[str] | None = None,
                 step_chains_share: float = 0.5, state_thinking_length: bool = False,
                 prompt_format: Literal["plain", "chat"] | None = None):
        super().__init__()
        if val_difficulties is not None and len(set(val_difficulties)) < len(val_difficulties):
            raise ValueError(f"data.val_difficulties {list(val_difficulties)} gives a difficulty twice; give each once")
        if bool(tasks) == bool(text_files):
            raise ValueError("give either tasks or text_files to train on")
        if text_files and tokenizer is None:
            raise ValueError("training on text needs a tokenizer directory (rlm tokenizer train ...)")
        if text_files:
            text_source(text_files)  # a missing file fails now, not after the model and trainer are set up
        self.save_hyperparameters()
        self.curriculum = Curriculum(min_difficulty, max_difficulty, curriculum_batches)
        self.tokenizer = self._load_tokenizer()
        if prompt_format is not None:
            if text_files:
                raise ValueError("data.prompt_format is how task problems are written: text_files are read as they are")
            set_prompt_format(self.tokenizer, prompt_format)  # saved with the tokenizer: every command then reads it
        self.step_chains = [chain for path in step_chains or [] for chain in load_step_chains(path)]
        if step_chains and not step_labels:
            raise ValueError("data.step_chains are labelled chains for a reward model: set data.step_labels: true")
        if tasks:
            for name in tasks:
                get_task(name).check_difficulty(max_difficulty)

    def _load_tokenizer(self):
        if self.hparams.tokenizer is None:
            extra = (STEP_TAG + GOOD_STEP + BAD_STEP if self.hparams.step_labels else "") + (
                BUDGET_ALPHABET if self.hparams.state_thinking_length else "")
            return task_tokenizer(self.hparams.tasks, extra)
        return load_tokenizer(self.hparams.tokenizer)  # a directory, or a shipped checkpoint's name

    def train_dataloader(self) -> DataLoader:
        options, trainer = self.hparams, self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if options.text_files:
            stream = TextStream(options.text_files, self.tokenizer, options.seq_len, rank=rank, world_size=world)
            return DataLoader(stream, batch_size=options.batch_size, num_workers=options.num_workers)
        # A resumed run starts at the batch after the last one it trained on: no batch repeated or skipped.
        done = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        stream = TaskStream(options.tasks, self.tokenizer, options.batch_size, self.curriculum, cot=options.cot,
                            loss_on=options.loss_on,
                            hints=options.hints, seed=options.seed, rank=rank, start_batch=done,
                            difficulty_per_batch=options.difficulty_per_batch,
                            step_error_rate=options.step_error_rate if options.step_labels else None,
                            step_chains=self.step_chains, step_chains_share=options.step_chains_share,
                            state_thinking_length=options.state_thinking_length)
        return DataLoader(stream, batch_size=None, num_workers=options.num_workers,
                          persistent_workers=options.num_workers > 0)

    def validation_problems(self):
        options = self.hparams
        if options.val_problems:
            return load_jsonl(options.val_problems)
        difficulties = options.val_difficulties or list(range(options.min_difficulty, options.max_difficulty + 1))
        return heldout_problems(options.tasks, difficulties, options.val_problems_per_difficulty)

    def val_dataloader(self) -> DataLoader | list:
        if not self.hparams.tasks and not self.hparams.val_problems:
            return []
        self.val_set = self.validation_problems()

        if self.hparams.step_labels:  # held-out step-labelled chains, the same ones every validation
            def labelled(i):
                problem, task = self.val_set[i], get_task(self.val_set[i].task)
                steps, labels = labelled_chain(task, problem, self.hparams.step_error_rate, random.Random(f"val/{i}"))
                return encode_step_labels(self.tokenizer, task.prompt(problem, cot=True), steps, labels)

            return DataLoader(range(len(self.val_set)), batch_size=max(self.hparams.batch_size, 64),
                              collate_fn=lambda indices: collate([labelled(i) for i in indices],
                                                                 self.tokenizer.pad_token_id))

        def batch(indices):  # problems travel as indices into val_set: tensors only cross devices
            encoded = [encode_problem(self.tokenizer, get_task(self.val_set[i].task), self.val_set[i], self.hparams.cot,
                                      self.hparams.loss_on, self.hparams.hints,
                                      state_thinking_length=self.hparams.state_thinking_length)
                       for i in indices]
            return {**collate(encoded, self.tokenizer.pad_token_id), "problem_index": torch.tensor(indices)}

        return DataLoader(range(len(self.val_set)), batch_size=max(self.hparams.batch_size, 64), collate_fn=batch)
