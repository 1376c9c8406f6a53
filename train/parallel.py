"""Sharded data parallel training (FSDP2) and compilation of a RecurrentLM, applied from outside the model
(torchtitan's style): the model code stays single-device, and this file is the one place that says how it is
sharded, checkpointed and compiled, in torchtitan's order (prepare_model): activation checkpointing of the core
blocks first, then torch.compile of every block (a compiled graph that contains the recomputation), then FSDP2.

    trainer:
      strategy: {class_path: recurrent_lm.train.parallel.FSDP2Strategy}
      devices: 8                         # GPUs per node (CPU: processes, gloo)
      num_nodes: 1
    model:
      sharding: {param_dtype: bfloat16}
      activation_checkpointing: true
      compile: true

The plan (`shard_model`): every prelude and coda block is its own FSDP2 unit, gathered for its one application and
resharded after it; the recurrent core's blocks are ONE unit that is not resharded after forward
(reshard_after_forward=False), so its weights are all-gathered once per training step and stay gathered over all r
applications (and the backward through them) instead of being re-gathered r times; the root unit holds the
embedding, the adapter, the norm and the head. A depth that differed between ranks would run a different number of
core applications, whose collectives would then pair up wrongly: the training module draws the depth from (seed,
step) alone and checks that every rank drew the same before it runs (RecurrentLMModule.check_depth_in_lockstep).

Why Lightning's ModelParallelStrategy (FSDP2) and not its FSDPStrategy (FSDP1): FSDP2 shards each parameter as a
DTensor, takes an explicit per-module plan (the core's reshard policy above), runs on CPU with gloo (so it is
tested here), and saves distributed checkpoints that reshard to another number of processes on load.
"""

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from recurrent_lm import RecurrentLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ShardingPlan:
    """How FSDP2 shards the model (read only under FSDP2Strategy).

    Args:
        param_dtype: the dtype parameters are all-gathered and computed in (mixed precision: "bfloat16" on GPUs);
            the sharded float32 copy stays the master. None: float32 throughout.
        reduce_dtype: the dtype gradients are reduce-scattered in.
        reshard_core_after_forward: reshard the core after each application (re-gathering it r times per step,
            less memory); False keeps it gathered across its r applications within a step.
    """

    param_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    reshard_core_after_forward: bool = False


def shard_model(model: RecurrentLM, mesh, plan: ShardingPlan) -> RecurrentLM:
    """Apply FSDP2 to a RecurrentLM in place: prelude and coda blocks one unit each, the core one unit, the root
    the rest (see the module docstring)."""
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[plan.param_dtype] if plan.param_dtype else None,
                                  reduce_dtype=DTYPES[plan.reduce_dtype])
    for block in [*model.prelude, *model.coda]:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(list(model.core), mesh=mesh, mp_policy=policy, reshard_after_forward=plan.reshard_core_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def prepare_model(model: RecurrentLM, activation_checkpointing: bool, compile: bool, mesh=None,
                  plan: "ShardingPlan | None" = None) -> RecurrentLM:
    """Activation checkpointing, compilation and FSDP2, applied in place in torchtitan's order (each at most once:
    Lightning may call configure_model again). Checkpointing wraps the blocks before compile sees them, so the
    compiled graph holds the recomputation; sharding comes last, over the compiled blocks."""
    if activation_checkpointing:
        checkpoint_core(model)
    if compile and not getattr(model, "blocks_compiled", False):
        compile_blocks(model)
        model.blocks_compiled = True
    if mesh is not None and not is_sharded(model):
        shard_model(model, mesh, plan or ShardingPlan())
    return model


def checkpoint_core(model: RecurrentLM) -> RecurrentLM:
    """Recompute each core block's activations in backward instead of keeping them: memory for the backpropagated
    steps no longer grows with mean_backprop_depth, at about one more forward of the core per step."""
    for index, block in enumerate(model.core):
        if not isinstance(block, CheckpointWrapper):
            model.core[index] = checkpoint_wrapper(block)
    return model


def compile_blocks(model: RecurrentLM, backend: str = "inductor") -> RecurrentLM:
    """torch.compile every block in place (its forward; parameter names unchanged), not the unrolled loop: the
    compiled region holds no host syncs (token checks, positions and the initial-state draw run eagerly around it)
    and sees the same arguments at every step, so one graph serves every depth without recompiling."""
    # RoPE's complex product runs as its eager kernel inside the graph, by design (recurrent_lm.model.apply_rope)
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
    for block in [*model.prelude, *model.core, *model.coda]:
        block.compile(backend=backend)
    return model


def check_strategy(strategy) -> None:
    """rlm train's strategies: one process, DDP, or FSDP2 through FSDP2Strategy. Lightning's FSDPStrategy (FSDP1),
    DeepSpeed and a bare ModelParallelStrategy would shard the core once per recurrence, or not by this plan."""
    name = type(strategy).__name__
    if name in ("FSDPStrategy", "DeepSpeedStrategy") or (uses_fsdp2(strategy) and name != "FSDP2Strategy"):
        raise ValueError(f"trainer.strategy {name}: rlm train shards with FSDP2 through "
                         "recurrent_lm.train.parallel.FSDP2Strategy (the core gathered once per step, not once "
                         "per recurrence); use it, or ddp")


def uses_fsdp2(strategy) -> bool:
    """Whether a Lightning strategy is FSDP2's (ModelParallelStrategy, which FSDP2Strategy specialises). Checked on
    Lightning's class: this file may be imported under two names (train.parallel, recurrent_lm.train.parallel)."""
    return isinstance(strategy, ModelParallelStrategy)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered from every rank (a collective: call it on all of them), on the CPU."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure sharded data parallelism (FSDP2 over every process of every node; no
    tensor parallelism), whose distributed checkpoints are written atomically: each checkpoint goes to a
    temporary directory beside it and is renamed into place when every rank has written its shard, so a run killed
    mid-save keeps its previous checkpoint. The LightningModule shards itself in configure_model (shard_model)."""

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        if self.root_device.type == "cpu" and torch.torch_version.TorchVersion(torch.__version__) < "2.7":
            raise ValueError(f"FSDP2 on CPU needs torch >= 2.7 (its CPU streams; this is {torch.__version__}); on "
                             "GPUs torch 2.6 serves, or use ddp")
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process shards the data
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        final = Path(self.broadcast(str(filepath)))
        staging = final.with_name(f".{final.name}.tmp")
        if self.global_rank == 0 and staging.exists():
            shutil.rmtree(staging) if staging.is_dir() else staging.unlink()
        self.barrier("checkpoint staging")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("checkpoint written")
        if self.global_rank == 0:
            previous = final.with_name(f".{final.name}.old")
            if final.exists():
                os.replace(final, previous)
            os.replace(staging, final)
            if previous.exists():
                shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
        self.barrier("checkpoint in place")

    def remove_checkpoint(self, filepath) -> None:
        if self.global_rank == 0:
            path = Path(filepath)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
