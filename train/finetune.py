"""`rlm finetune`: s1-style supervised fine-tuning of any transformers causal LM (a RecurrentLM included) on
reasoning traces (question, thinking trajectory, answer; recurrent_lm.traces), with Lightning underneath.

    rlm finetune --config s1 --model.model DIR --data.train_files [traces.jsonl] [--trainer.precision 32-true]

The loss covers the thinking, the end-of-thinking delimiter, the answer and eos; the prompt is masked. The thinking
delimiters are added to a tokenizer that lacks them (the model's embeddings grow to hold them). Without a chat
template a trace renders exactly as the project's tasks render a chain of thought, so a model fine-tuned on task
traces (`rlm tasks export NAME FILE --format traces`) is a CoT baseline that `rlm compare --cot DIR` and budget
forcing take as it is.

A run is `rlm train`'s (train/cli.py): LightningCLI (every option in YAML, `rlm finetune --help` lists them), its own
directory {trainer.default_root_dir} with atomic checkpoints and `--ckpt_path last`, any Lightning strategy (ddp,
fsdp) and precision, and at the end the fine-tuned model and tokenizer exported to {default_root_dir}/model.
"""

import math

import lightning as L
import torch
from torch.utils.data import DataLoader

from recurrent_lm import RecurrentLM
from recurrent_lm.data import HUB_PREFIX, collate, set_prompt_format
from recurrent_lm.loading import load_any_causal_lm, load_tokenizer, model_type
from recurrent_lm.options import ranges
from recurrent_lm.traces import (ANSWER_FIELD, QUESTION_FIELD, THINKING_FIELD, add_thinking_delimiters, encode_trace,
                                 load_traces, pack_examples, uses_chat_template)

from .cli import RunCLI, build_cli, fit_and_export, keep_last_checkpoint
from .module import lr_factor


@ranges("model.", learning_rate="> 0", weight_decay=">= 0", betas="[0, 1)", warmup_ratio="[0, 1)", min_lr_ratio="[0, 1]",
        num_steps=">= 1", seed=">= 0")
class FinetuneModule(L.LightningModule):
    """Fine-tunes a causal LM (any transformers AutoModelForCausalLM directory, or a RecurrentLM) on traces.

    Args:
        model: the model to fine-tune: a local transformers directory (config.json and safetensors weights) or a
            shipped checkpoint's name (demo-cot, ...). Its weights train in float32; trainer.precision sets the
            compute (bf16-mixed on a GPU).
        tokenizer: a tokenizer directory; by default the model's own. The thinking delimiters are added to it where
            it lacks them (the model's token embeddings then grow), and it is exported with the model.
        learning_rate: peak learning rate of AdamW (s1: 1e-5).
        weight_decay: AdamW weight decay, on matrices only (not on norms and biases) (s1: 1e-4).
        betas: AdamW betas (s1: 0.9, 0.95).
        warmup_ratio: linear warmup over this share of all optimizer steps (s1: 0.05), then a cosine decay to
            min_lr_ratio * the peak at the last step.
        min_lr_ratio: the final learning rate as a share of the peak (s1: 0).
        num_steps: for a RecurrentLM, train at this fixed depth (core steps, all differentiable); by default each
            step draws its depth as pretraining did (the same draw on every rank, from seed and step).
        seed: seeds a RecurrentLM's per-step depth draws and initial states.
    """

    def __init__(self, model: str, tokenizer: str | None = None, learning_rate: float = 1e-5,
                 weight_decay: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95), warmup_ratio: float = 0.05,
                 min_lr_ratio: float = 0.0, num_steps: int | None = None, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        kind = model_type(model)  # checked, with the tokenizer, before the model loads (which may take minutes)
        if num_steps is not None and kind != "recurrent_lm":
            raise ValueError(f"model.num_steps sets a RecurrentLM's depth; {model} holds a {kind!r} model")
        self.tokenizer = load_tokenizer(tokenizer or model)
        add_thinking_delimiters(self.tokenizer)
        self.model = load_any_causal_lm(model).float().train()  # loaded in eval mode; Lightning keeps a mode
        add_thinking_delimiters(self.tokenizer, self.model)  # the embeddings grow to the tokenizer's size
        if self.tokenizer.pad_token is None:  # padded batches (and budget forcing later) need one; labels skip it
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def forward_kwargs(self) -> dict:
        """A RecurrentLM's depth: fixed (num_steps), or drawn from (seed, step) alone, the same on every rank."""
        if not isinstance(self.model, RecurrentLM):
            return {}
        generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        return {"num_steps": self.hparams.num_steps, "generator": generator}

    def training_step(self, batch, batch_index):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                         **self.forward_kwargs())
        self.log_dict({"train/loss": out.loss, "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"]},
                      prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def validation_step(self, batch, batch_index):
        kwargs = {"num_steps": self.hparams.num_steps, "init_scale": 0.0} if isinstance(self.model, RecurrentLM) else {}
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                         **kwargs)
        self.log("val/loss", out.loss, batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        hparams = self.hparams
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hparams.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=hparams.learning_rate, betas=tuple(hparams.betas))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = math.ceil(hparams.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
            step, warmup, total, "cosine", hparams.min_lr_ratio, 1.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@ranges("data.", max_length=">= 2", batch_size=">= 1", num_workers=">= 0")
class TraceDataModule(L.LightningDataModule):
    """Reasoning traces, rendered and encoded with the model's tokenizer (the module's, handed over by
    `rlm finetune` before training: `use_tokenizer`).

    Args:
        train_files: the traces to train on: local JSON Lines (.jsonl), parquet or .json files, or one hub dataset
            named hub:NAME (needs the network, e.g. hub:simplescaling/s1K). A row that lacks a field, or whose
            field is empty, is an error naming its file, line and field.
        val_files: traces to report val/loss on, in the same forms (none by default).
        question_field: the field holding the question (the prompt).
        thinking_field: the field holding the thinking trajectory: a string, or a list of strings joined with "\\n"
            (s1K's thinking_trajectories).
        answer_field: the field holding the answer written after the thinking (s1K's attempt).
        chat_template: render through the tokenizer's chat template where it has one (the question as the user
            turn, the generation prompt, then <think>); false, or a tokenizer without one: the project's
            chain-of-thought format, question<think>thinking</think>answer<eos>, which `rlm compare --cot` prompts.
        max_length: tokens per sequence (s1: 32768). Without packing a longer trace is cut to it (its tail gets no
            loss; the number cut is printed); with packing, the block length.
        pack: concatenate the encoded traces (labels and all) and cut them into blocks of max_length tokens, so
            that no compute goes to padding (attention then spans the traces of a block); false: one trace per
            sequence, batches padded to their longest (s1's way).
        batch_size: sequences per batch per device (s1: 16 per optimizer step in all; with accumulate_grad_batches
            and devices, batch_size x devices x accumulate_grad_batches).
        num_workers: DataLoader workers.
    """

    def __init__(self, train_files: list[str] | str, val_files: list[str] | str | None = None,
                 question_field: str = QUESTION_FIELD, thinking_field: str = THINKING_FIELD,
                 answer_field: str = ANSWER_FIELD, chat_template: bool = True, max_length: int = 32768,
                 pack: bool = False, batch_size: int = 16, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()
        fields = dict(question_field=question_field, thinking_field=thinking_field, answer_field=answer_field)
        self.train_traces = load_traces(train_files, **fields)  # a bad row fails now, before any set-up
        self.val_traces = load_traces(val_files, **fields) if val_files else []
        self.tokenizer = None
        self.train_set = self.val_set = None

    def use_tokenizer(self, tokenizer) -> None:
        """Train on `tokenizer`; a model trained through its chat template records the chat format on it, so that
        `rlm compare` and `rlm sweep` prompt the fine-tuned model as it learned (recurrent_lm.data.prompt_text)."""
        self.tokenizer = tokenizer
        if uses_chat_template(tokenizer, self.hparams.chat_template):
            set_prompt_format(tokenizer, "chat")

    def encode(self, traces) -> list[dict[str, list[int]]]:
        if self.tokenizer is None:
            raise ValueError("TraceDataModule needs the model's tokenizer: call use_tokenizer(tokenizer) first")
        options = self.hparams
        examples = [encode_trace(self.tokenizer, trace, options.chat_template) for trace in traces]
        if options.pack:
            return pack_examples(examples, options.max_length)
        cut = sum(len(e["input_ids"]) > options.max_length for e in examples)
        if cut:
            print(f"{cut} of {len(examples)} traces are longer than data.max_length = {options.max_length} tokens "
                  "and were cut to it")
        return [{k: v[: options.max_length] for k, v in e.items()} for e in examples]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self.encode(self.train_traces)
            self.val_set = self.encode(self.val_traces) if self.val_traces else []

    def _collate(self, examples):
        return collate(examples, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, collate_fn=self._collate,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_set:
            return []
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, collate_fn=self._collate,
                          num_workers=self.hparams.num_workers)


class FinetuneCLI(RunCLI):
    input_options = ("model.model", "model.tokenizer", "data.train_files", "data.val_files")

    def before_instantiate_classes(self) -> None:
        """Local trace files are read and checked before the model loads (which may take minutes); a hub dataset
        is read once, by the data module."""
        super().before_instantiate_classes()
        data = self.config.data
        for files in (data.train_files, data.val_files):
            if files and not any(str(f).startswith(HUB_PREFIX) for f in files):
                load_traces(files, data.question_field, data.thinking_field, data.answer_field)

    run_defaults = {**RunCLI.run_defaults, "trainer.max_epochs": 5, "trainer.log_every_n_steps": 1,
                    "trainer.default_root_dir": "runs/finetune", "trainer.callbacks": keep_last_checkpoint()}


def finetune_main(argv: list[str]) -> None:
    """rlm finetune --config FILE.yaml|NAME [--OPTION VALUE ...] (`rlm finetune --help` lists every option)."""
    cli = build_cli(FinetuneCLI, FinetuneModule, TraceDataModule, argv, prog="rlm finetune")
    module, data = cli.model, cli.datamodule
    data.use_tokenizer(module.tokenizer)
    fit_and_export(cli, module.model, module.tokenizer, command="rlm finetune")
