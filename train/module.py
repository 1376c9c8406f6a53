"""The LightningModule around RecurrentLM: random depth with truncated backprop, AdamW, warmup + cosine or
warmup-stable-decay, and validation at several fixed depths so users watch depth scaling emerge.

Model code stays single-device (recurrent_lm.model); parallelism, precision and checkpointing come from the
Lightning Trainer's strategy and plugins.
"""

import dataclasses
import math
import time
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from recurrent_lm import RecurrentConfig, RecurrentLM
from recurrent_lm.adaptive import settled_from
from recurrent_lm.answering import accuracy, answer_problems
from recurrent_lm.data import takes_loss
from recurrent_lm.depth import (RecurrenceCurriculum, StepCounts, difficulty_num_steps, sample_num_steps,
                                 truncated)
from recurrent_lm.loading import load_config, load_model
from recurrent_lm.options import ranges

from .checkpoints import ArchitectureSpec, build_config, resolved_spec, saved_architecture
from .distillation import Teacher, distillation_loss, distilled_positions
from .parallel import ShardingPlan, check_strategy, is_sharded, prepare_model, uses_fsdp2

# Fields that set how a model is trained and run, not what its weights are: init_from may differ in them.
SETTINGS_FIELDS = ("exit_gate_width", "mean_recurrence", "mean_backprop_depth")


@ranges("model.", learning_rate="> 0", weight_decay=">= 0", betas="[0, 1)", warmup_steps=">= 0", min_lr_ratio="[0, 1]",
        decay_fraction="(0, 1]", fixed_num_steps=">= 1", steps_per_difficulty=">= 1", extra_steps=">= 0",
        seed=">= 0", eval_depths=">= 1", exit_gate_depth=">= 2", progressive_loss="[0, 1]", abacus_offset=">= 0",
        distill_depth=">= 1", distill_weight="(0, 1]", distill_temperature="> 0")
class RecurrentLMModule(L.LightningModule):
    """Trains a RecurrentLM.

    Args:
        architecture: the model's shape: `preset` (a name in recurrent_lm.config.PRESETS) and any RecurrentConfig
            field to override, e.g. {preset: debug, vocab_size: 48}. Leave it out with init_from to train the
            init_from model's own shape (a retrofitted model's, say); fields given then override that shape's
            training settings (mean_recurrence, mean_backprop_depth), never its weights' shapes.
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only (not to norms, biases or the qk bias).
        betas: AdamW betas.
        warmup_steps: linear warmup from 0 to the peak.
        schedule: after warmup, "cosine" decays to min_lr_ratio * peak by the last step; "wsd"
            (warmup-stable-decay) holds the peak and decays linearly over the last decay_fraction of the steps;
            "constant" holds it.
        min_lr_ratio: final learning rate as a fraction of the peak.
        decay_fraction: share of the steps spent decaying under "wsd".
        fixed_num_steps: train at this depth every step instead of sampling it (1 gives an ordinary transformer
            of prelude + core + coda layers: the chain-of-thought baseline).
        steps_per_difficulty: tie the training depth to the batch's difficulty k instead of sampling it: k times
            this many steps, plus 0..extra_steps more (needs data.difficulty_per_batch). Looped transformers that
            learn one step of an algorithm per iteration this way extrapolate to larger k (Fan et al. 2024).
        extra_steps: the most steps drawn on top of the tied depth, so that steps past a solved state learn to
            leave it alone.
        seed: seeds the per-step depth draws and initial states, identically on every rank, so that DDP/FSDP
            ranks run the same number of steps and a resumed run repeats nothing.
        eval_depths: depths at which validation loss and accuracy are measured.
        eval_cot: validation problems are answered with a chain of thought.
        init_from: a model directory (or a shipped checkpoint's name) whose weights start this model; its
            architecture must equal this one's, except for an exit gate that this one adds.
        recurrence_curriculum: ramp the mean training depth from `start` up to mean_recurrence over a `share` of
            the steps, with a ramp `shape` (recurrent_lm.depth.RecurrenceCurriculum); None draws at
            mean_recurrence from the first step.
        trainable: the parameters that train, by name prefix (e.g. [adapter] for the input injection alone, the
            cheap first stage of retrofitting recurrence into a pretrained model; [adapter, core] for the loop);
            the others keep their weights. None: every parameter trains.
        sharding: how FSDP2 shards the model under trainer.strategy FSDP2Strategy (train.parallel.ShardingPlan:
            mixed precision, the core's reshard policy).
        activation_checkpointing: recompute each core block's activations in backward instead of keeping them
            (memory for the backpropagated steps stops growing with mean_backprop_depth; about one more forward of
            the core per step). With or without sharding, and with compile: checkpointing, then compile, then
            FSDP2, torchtitan's order (train.parallel.prepare_model).
        compile: torch.compile each block (not the unrolled loop: one graph for every depth; train.parallel.
            compile_blocks).
        objective: "lm" trains the language model; "exit_gate" freezes it (start it with init_from) and trains
            only its exit gate (architecture.exit_gate_width > 0), as Ouro's second stage: at every step of an
            unroll to exit_gate_depth, binary cross-entropy against whether each position's logit-lens prediction
            already equals its final one and stays so, at every real position (prompt and answer).
        prompt_depth: "same": every position runs the step's depth r. "random": each position that takes no loss
            (the prompt, under data.loss_on answer) draws its own depth, uniform in 1..r, while the positions that
            take a loss run r and, at their deeper steps, read the others' latest keys and values, as they do at
            inference when those exit early (recurrent_lm.active's KV sharing): the model learns not to need
            later steps of the prompt, so that exiting it early is safe.
        progressive_loss: the progressive loss of Bansal et al. 2022 (arXiv 2202.05826) with this weight a: of the
            step's depth m (drawn by whichever rule above), n steps uniform in 0..m-1 run without gradient from the
            initial state, then k uniform in 1..m-n more (the last mean_backprop_depth of them with gradient); the
            loss is (1 - a) CE(after m steps) + a CE(after n + k). The model learns to improve any state it is
            handed, not one unroll from the start; 1 (theirs for prefix sums) keeps the partial unroll only. None:
            the loss after the m steps alone.
        abacus_offset: in training, every batch's Abacus positions (architecture.abacus_positions) are shifted by one
            offset drawn uniformly in 0..abacus_offset (McLeish et al. 2024: 100), so that the table's rows past
            the trained lengths train too; at test time the offset is 0. The table must hold the longest trained
            number plus this offset.
        abacus_places: how a batch's Abacus positions are spread over the rows 1..(its longest number +
            abacus_offset): "offset", one contiguous block at a random start (McLeish et al.); "random", a sorted
            random sample of those rows, one per place, the same for every number of the batch (the randomized
            positions of Ruoss et al. 2023, arXiv 2305.16843). With "random" every pair of rows occurs together in
            training, so a test number longer than any trained one meets no pair of rows it never had to tell
            apart; the model must then find "the next digit" as the next row present, not the row plus one.
        exit_gate_depth: the depth of the unrolls the exit gate learns from (at least the depths it will serve).
            The unrolls start from the model's random initial state (init_scale), as training does; the shipped
            gate agrees with its targets as often from a zero state (0.971 against 0.968 on 64 problems).
        distill_from: a teacher model (anything --model resolves: a directory, a shipped name, a GGUF file, an
            installed source such as smollm2-135m-instruct) whose logits on the same batch the model learns from,
            e.g. the pretrained source a retrofitted model was cut from. It must share the tokenizer. It runs
            without gradient beside the model and is kept out of checkpoints. None: no distillation.
        distill_depth: a recurrent teacher's depth (zero initial state); None: its mean_recurrence.
        distill_weight: the loss is (1 - w) CE + w T^2 KL(teacher || student), each at temperature T.
        distill_temperature: T, softening both distributions (Hinton et al. 2015).
        distill_on: the positions that learn from the teacher: "labels", those that take the loss (the answer,
            under data.loss_on answer); "all", every position, the prompt's too (the source's behaviour on the
            question, which a retrofit that dropped layers must rebuild).
    """

    def __init__(self, architecture: ArchitectureSpec | None = None, learning_rate: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 100,
                 schedule: Literal["cosine", "wsd", "constant"] = "cosine", min_lr_ratio: float = 0.1,
                 decay_fraction: float = 0.2, fixed_num_steps: int | None = None,
                 steps_per_difficulty: int | None = None, extra_steps: int = 0, seed: int = 0,
                 eval_depths: list[int] = (1, 4, 8, 16, 32), eval_cot: bool = False, init_from: str | None = None,
                 objective: Literal["lm", "exit_gate"] = "lm", exit_gate_depth: int = 16,
                 recurrence_curriculum: RecurrenceCurriculum | None = None, trainable: list[str] | None = None,
                 sharding: ShardingPlan = ShardingPlan(), activation_checkpointing: bool = False, compile: bool = False,
                 prompt_depth: Literal["same", "random"] = "same", progressive_loss: float | None = None,
                 abacus_offset: int = 0, abacus_places: Literal["offset", "random"] = "offset",
                 distill_from: str | None = None, distill_depth: int | None = None, distill_weight: float = 0.5,
                 distill_temperature: float = 1.0, distill_on: Literal["labels", "all"] = "labels"):
        super().__init__()
        if len(set(eval_depths)) < len(eval_depths):
            raise ValueError(f"model.eval_depths {list(eval_depths)} gives a depth twice; give each once")
        if steps_per_difficulty is not None and fixed_num_steps is not None:
            raise ValueError("model.steps_per_difficulty ties the depth to the difficulty: it excludes fixed_num_steps")
        config = self._architecture(architecture, init_from)
        if fixed_num_steps is not None:  # the model's default (eval) depth, and its init, follow the fixed depth
            config = build_config(dataclasses.replace(
                resolved_spec(config), mean_recurrence=fixed_num_steps,
                mean_backprop_depth=min(config.mean_backprop_depth, fixed_num_steps)))
        self.spec = resolved_spec(config)
        self.save_hyperparameters({"architecture": dataclasses.asdict(self.spec)} | {  # plain data: weights-only loads
            k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in locals().items()
            if k not in ("self", "architecture", "spec", "config", "__class__")})
        self.model = RecurrentLM(config)
        if init_from is not None:
            self._load_weights(init_from)
        if recurrence_curriculum is not None and (fixed_num_steps is not None or steps_per_difficulty is not None):
            raise ValueError("model.recurrence_curriculum ramps the sampled depth: it excludes fixed_num_steps and "
                             "steps_per_difficulty")
        if abacus_offset and not self.model.counts_abacus:
            raise ValueError("model.abacus_offset shifts Abacus positions: set model.architecture.abacus_positions "
                             "or abacus_rope")
        if abacus_places == "random" and not abacus_offset:
            raise ValueError("model.abacus_places random samples rows among the longest number + abacus_offset: set "
                             "model.abacus_offset > 0")
        if progressive_loss is not None and prompt_depth == "random":
            raise ValueError("model.progressive_loss unrolls part of the step's depth: it excludes prompt_depth random")
        if trainable is not None:
            if objective != "lm":
                raise ValueError("model.trainable chooses what of the language model trains: objective lm")
            prefixes = tuple(prefix.rstrip(".") + "." for prefix in trainable)
            names = [name for name, _ in self.model.named_parameters()]
            unmatched = [p for p in prefixes if not any(name.startswith(p) for name in names)]
            if unmatched or not trainable:
                raise ValueError(f"model.trainable {list(trainable)}: {unmatched or 'nothing'} names no parameter "
                                 "(prefixes such as adapter, core, core.0, prelude, coda, embed_tokens, norm)")
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(name.startswith(prefixes))
        if objective == "exit_gate":
            if init_from is None:
                raise ValueError("model.objective exit_gate trains a gate on a trained model: set model.init_from")
            if self.model.exit_gate is None:
                raise ValueError("model.objective exit_gate trains an exit gate: set model.architecture.exit_gate_width")
            for name, parameter in self.model.named_parameters():  # the language model stays as it is
                parameter.requires_grad_(name.startswith("exit_gate."))
        elif self.model.exit_gate is not None:  # the LM loss never reaches a gate: keep it as it is (DDP, export)
            self.model.exit_gate.requires_grad_(False)
        if distill_from is None and distill_depth is not None:
            raise ValueError("model.distill_depth is a teacher's depth: set model.distill_from")
        if distill_from is not None and objective != "lm":
            raise ValueError("model.distill_from teaches the language model: objective lm")
        # a plain attribute, not a submodule: outside the parameters, the checkpoints and the strategy's reach
        self.teacher = None if distill_from is None else Teacher(distill_from, distill_depth,
                                                                  self.model.config.vocab_size)
        self._step_started = None

    @staticmethod
    def _architecture(architecture, init_from: str | None) -> RecurrentConfig:
        """The config to train: the architecture spec's, or (without a preset) init_from's own shape with the
        spec's fields over it."""
        spec = architecture if isinstance(architecture, ArchitectureSpec | None) else ArchitectureSpec(**architecture)
        if spec is not None and spec.preset is not None:
            return build_config(spec)
        if init_from is None:
            if spec is None:
                raise ValueError("model.architecture is missing: give a preset (e.g. {preset: debug}) or "
                                 "model.init_from a model to start from")
            return build_config(spec)
        given = {} if spec is None else {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}
        return build_config(dataclasses.replace(resolved_spec(load_config(init_from)), **given))

    def _load_weights(self, source: str) -> None:
        """Start from a trained model's weights (a fresh run; a resumed one then restores its own checkpoint)."""
        loaded = load_model(source)
        ours, theirs = resolved_spec(self.model.config), resolved_spec(loaded.config)
        differences = {k: (getattr(theirs, k), v) for k, v in dataclasses.asdict(ours).items()
                       if k not in SETTINGS_FIELDS and getattr(theirs, k) != v}
        if differences:
            raise ValueError(f"model.init_from {source}: another architecture, (init_from, config): {differences}")
        missing, unexpected = self.model.load_state_dict(loaded.state_dict(), strict=False)
        unmatched = [k for k in missing + unexpected if not k.startswith("exit_gate.")]
        if unmatched:
            raise ValueError(f"model.init_from {source}: weights that do not match: {unmatched}")

    def configure_model(self) -> None:
        """Called by Lightning once the processes are up: compile the blocks if asked, and under FSDP2Strategy shard
        the model by the plan (the model code itself stays single-device). Any other sharding strategy is refused
        here, before a step runs."""
        strategy = self.trainer.strategy
        check_strategy(strategy)  # rlm train checked it when it built the trainer; a Trainer built elsewhere too
        plan, mesh = self.hparams.sharding, None
        plan = ShardingPlan(**plan) if isinstance(plan, dict) else plan
        if uses_fsdp2(strategy):
            if plan.param_dtype == "float16" or self.trainer.precision in ("16-mixed", "16-true"):
                raise ValueError("FSDP2 with float16 needs a sharded gradient scaler, which rlm train does not "
                                 "have: use bfloat16 (model.sharding.param_dtype bfloat16, trainer.precision "
                                 "bf16-mixed or 32-true)")
            mesh = self.device_mesh["data_parallel"]
        prepare_model(self.model, self.hparams.activation_checkpointing, self.hparams.compile, mesh, plan)

    def check_depth_in_lockstep(self, num_steps: StepCounts) -> None:
        """Every rank must run the same depth (and the same truncated-backprop split): with sharded weights, a rank
        that ran more core steps would pair its all-gathers with another rank's next ones and hang or mix weights.
        One tiny all-gather per step turns that into an error naming the depths."""
        if self.trainer.world_size < 2:
            return
        drawn = self.all_gather(torch.tensor(list(num_steps), device=self.device))
        if not bool((drawn == drawn[0]).all()):
            raise RuntimeError(f"ranks drew different depths (no-grad, grad) {drawn.tolist()} at step "
                               f"{self.global_step}: the depth must be a function of (seed, step) alone")

    def on_load_checkpoint(self, checkpoint) -> None:
        """Resuming from a checkpoint of another architecture is a clear error, not a state-dict shape dump."""
        saved = saved_architecture(checkpoint)
        current = dataclasses.asdict(self.spec)
        differences = {k: (saved.get(k), v) for k, v in current.items() if saved is not None and saved.get(k) != v}
        if differences:
            raise ValueError(f"the checkpoint is of another architecture, (checkpoint, config): {differences}")

    # --- depth per step ----------------------------------------------------------------------------------------------

    def _generator(self, step: int, salt: int) -> torch.Generator:
        """A random source that depends only on (seed, step, salt): the same on every rank and after a resume."""
        return torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + step * 7 + salt)

    def num_steps_for(self, global_step: int, difficulty: int | None = None) -> StepCounts:
        """(no-grad, grad) steps of a training step: a pure function of (seed, step, and the batch's difficulty when
        the depth is tied to it), equal on every rank."""
        hparams, config = self.hparams, self.model.config
        if hparams.fixed_num_steps is not None:
            return StepCounts(0, hparams.fixed_num_steps)
        generator = self._generator(global_step, salt=0)
        if hparams.steps_per_difficulty is not None:
            if difficulty is None:
                raise ValueError("model.steps_per_difficulty ties the depth to each batch's difficulty: set "
                                 "data.difficulty_per_batch: true")
            return difficulty_num_steps(difficulty, hparams.steps_per_difficulty, hparams.extra_steps,
                                        config.mean_backprop_depth, generator)
        return sample_num_steps(self.mean_recurrence_at(global_step), config.mean_backprop_depth, generator)

    def mean_recurrence_at(self, global_step: int) -> float:
        """The mean of the training depth draw at a step: mean_recurrence, or the curriculum's value."""
        curriculum, target = self.hparams.recurrence_curriculum, self.model.config.mean_recurrence
        if curriculum is None:
            return target
        if isinstance(curriculum, dict):  # hyperparameters hold it as plain data
            curriculum = RecurrenceCurriculum(**curriculum)
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None
        if total is None:
            raise ValueError("model.recurrence_curriculum needs trainer.max_steps")
        return curriculum.mean_at(global_step / total, target)

    # --- training ------------------------------------------------------------------------------------------------------

    def training_step(self, batch, batch_index):
        if self.hparams.objective == "exit_gate":
            return self.exit_gate_step(batch)
        difficulty = int(batch["difficulty"][0]) if "difficulty" in batch else None
        num_steps = self.num_steps_for(self.global_step, difficulty)
        self.check_depth_in_lockstep(num_steps)
        position_depths = None
        if self.hparams.prompt_depth == "random":
            position_depths = prompt_depths(batch["labels"], num_steps.total, self._generator(self.global_step, salt=2))
        abacus_ids = self.training_abacus_ids(batch["input_ids"]) if self.hparams.abacus_offset else None
        weight = self.hparams.progressive_loss
        runs = [(num_steps, 1.0)] if weight is None else [
            (progressive_num_steps(num_steps.total, self.model.config.mean_backprop_depth,
                                   self._generator(self.global_step, salt=3)), weight), (num_steps, 1.0 - weight)]
        teacher_logits = None if self.teacher is None else self.teacher.logits(batch["input_ids"],
                                                                                 batch["attention_mask"])
        loss = 0.0
        for steps, share in runs:
            if share > 0:
                out = self.model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                                 num_steps=steps, generator=self._generator(self.global_step, salt=1),
                                 position_depths=position_depths, abacus_ids=abacus_ids)
                loss = loss + share * self.distilled(out, batch, teacher_logits)
        tokens = int(batch["attention_mask"].sum()) * self.trainer.world_size
        self.log_dict({"train/loss": loss, "train/num_steps": float(sum(num_steps)),
                       "train/mean_recurrence": float(self.mean_recurrence_at(self.global_step)),
                       "train/backprop_steps": float(num_steps[1]),
                       "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"]}, prog_bar=True)
        if self._step_started is not None:
            self.log("train/tokens_per_s", tokens / (time.perf_counter() - self._step_started))
        self._step_started = time.perf_counter()
        return loss

    def distilled(self, out, batch, teacher_logits: Tensor | None) -> Tensor:
        """The step's loss: the model's CE, mixed with the KL to the teacher's logits when there is a teacher."""
        if teacher_logits is None:
            return out.loss
        hparams = self.hparams
        positions = distilled_positions(batch["labels"], batch["attention_mask"], hparams.distill_on)
        kl = distillation_loss(out.logits, teacher_logits, positions, hparams.distill_temperature)
        self.log_dict({"train/ce": out.loss, "train/kl": kl})
        return (1 - hparams.distill_weight) * out.loss + hparams.distill_weight * kl

    def training_abacus_ids(self, input_ids: Tensor) -> Tensor:
        """The batch's Abacus positions spread over the table's rows (abacus_places), one draw per batch (an offset
        is the same on every rank; random places follow each rank's longest number)."""
        places = self.model.abacus_ids(input_ids)
        generator = self._generator(self.global_step, salt=4)
        if self.hparams.abacus_places == "offset":
            offset = int(torch.randint(0, self.hparams.abacus_offset + 1, (), generator=generator))
            return places + offset * (places > 0)
        longest = int(places.max())
        rows = torch.randperm(longest + self.hparams.abacus_offset, generator=generator)[:longest].sort().values + 1
        return torch.cat([rows.new_zeros(1), rows]).to(places.device)[places]

    def exit_gate_step(self, batch):
        """Unroll the frozen model to exit_gate_depth without a graph, then fit the gate on every step's state."""
        depth = self.hparams.exit_gate_depth
        with torch.no_grad():
            out = self.model(batch["input_ids"], attention_mask=batch["attention_mask"], num_steps=depth,
                             output_step_logits=True, output_latent_states=True,
                             generator=self._generator(self.global_step, salt=1))
            predictions = torch.stack([logits.argmax(-1) for logits in out.step_logits])  # (steps, batch, seq)
            step = torch.arange(1, depth + 1, device=predictions.device)[:, None, None]
            settled = (step >= settled_from(predictions == predictions[-1:])).float()
        logits = self.model.exit_gate(torch.stack(out.latent_states))
        real = batch["attention_mask"].bool().expand_as(logits)
        loss = F.binary_cross_entropy_with_logits(logits[real], settled[real])
        agree = ((logits[real] > 0).float() == settled[real]).float().mean()
        self.log_dict({"train/loss": loss, "train/exit_gate_agreement": agree, "train/num_steps": float(depth),
                       "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"]}, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_index):
        """Loss and the share of supervised tokens predicted right at every eval depth on held-out problems
        (teacher forcing), and greedy task accuracy."""
        for depth in self.hparams.eval_depths:
            out = self.model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                             num_steps=depth, init_scale=0.0)
            targets, supervised = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
            right = (out.logits[:, :-1].argmax(-1) == targets)[supervised].float()
            self.log(f"val/loss_r{depth}", out.loss, batch_size=batch["input_ids"].shape[0], sync_dist=True)
            # every supervised token predicted right (answer tokens; a reward model's step labels)
            self.log(f"val/label_acc_r{depth}", right.mean(), batch_size=int(supervised.sum()), sync_dist=True)
        if "problem_index" in batch:
            datamodule = self.trainer.datamodule
            problems = [datamodule.val_set[i] for i in batch["problem_index"].tolist()]
            tokenizer = datamodule.tokenizer
            # sharded weights: every rank runs as many forwards as the slowest (transformers' synced_gpus)
            synced = {"synced_gpus": True} if self.trainer.world_size > 1 and is_sharded(self.model) else {}
            for depth in self.hparams.eval_depths:
                answers = answer_problems(self.model, tokenizer, problems, cot=self.hparams.eval_cot,
                                          num_steps=depth, init_scale=0.0, **synced)
                self.log(f"val/acc_r{depth}", accuracy(answers), batch_size=len(problems), sync_dist=True)

    # --- optimisation ----------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            (decay if parameter.ndim == 2 else no_decay).append(parameter)  # matrices decay; norms, biases don't
        hparams = self.hparams
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hparams.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=hparams.learning_rate, betas=tuple(hparams.betas))
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None and hparams.schedule != "constant":
            raise ValueError(f"schedule {hparams.schedule!r} needs trainer.max_steps")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
            step, hparams.warmup_steps, total, hparams.schedule, hparams.min_lr_ratio, hparams.decay_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def progressive_num_steps(depth: int, backprop_depth: int, generator: torch.Generator) -> StepCounts:
    """The progressive loss's partial unroll of a depth-m step (Bansal et al. 2022): n uniform in 0..m-1 steps
    without gradient, then k uniform in 1..m-n, of which the last `backprop_depth` get gradients."""
    n = int(torch.randint(0, depth, (), generator=generator))
    k = int(torch.randint(1, depth - n + 1, (), generator=generator))
    return truncated(n + k, backprop_depth)


def prompt_depths(labels: Tensor, total: int, generator: torch.Generator) -> Tensor:
    """Per-position depths for prompt_depth "random": `total` at the positions that take a loss (position t
    predicts label t + 1), a uniform draw in 1..total at every other position."""
    drawn = torch.randint(1, total + 1, labels.shape, generator=generator).to(labels.device)
    return torch.where(takes_loss(labels), total, drawn)


def lr_factor(step: int, warmup: int, total: int | None, schedule: str, min_ratio: float, decay_fraction: float) -> float:
    """Multiplier of the peak learning rate at an optimizer step."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total is None:
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = total - decay_fraction * total  # wsd
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - min_ratio) * min(1.0, (step - decay_start) / max(1.0, total - decay_start))
