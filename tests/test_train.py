"""Training with Lightning: a debug run learns, kill-and-resume continues exactly, DDP on 2 CPU processes, export."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from recurrent_lm import RecurrentLM
from recurrent_lm.train.checkpoints import export_checkpoint
from recurrent_lm.train.cli import train_main
from recurrent_lm.train.module import RecurrentLMModule, lr_factor

ROOT = Path(__file__).parent.parent
DEBUG = str(ROOT / "configs" / "debug.yaml")


def train(tmp_path, *overrides, name="run"):
    root = tmp_path / name
    train_main(["--config", DEBUG, "--trainer.default_root_dir", str(root),
                "--trainer.logger.init_args.save_dir", str(root), *overrides])
    return root


def logged(root, key):
    rows = list(csv.DictReader(open(next(root.glob("**/metrics.csv")))))
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def test_debug_run_learns_and_exports(tmp_path):
    root = train(tmp_path, "--trainer.max_steps", "40", "--trainer.val_check_interval", "40")
    losses = [loss for _, loss in logged(root, "train/loss")]
    assert losses[-1] < 0.6 * losses[0], losses
    depths = {d for _, d in logged(root, "train/num_steps")}
    assert len(depths) > 1, "the depth is drawn afresh each step"
    assert {"val/loss_r1", "val/acc_r4"} <= set(next(csv.DictReader(open(next(root.glob("**/metrics.csv"))))).keys())
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    assert isinstance(model, RecurrentLM)
    ids = tokenizer("a=3;b=a+4;b?", return_tensors="pt").input_ids
    out = model.generate(ids, num_steps=4, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 2)
    # and the command-line export of the checkpoint gives the same weights
    exported = export_checkpoint(root / "checkpoints" / "last.ckpt", tmp_path / "exported")
    a, b = load_file(root / "model" / "model.safetensors"), load_file(exported / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cot_baseline_trains_at_fixed_depth(tmp_path):
    root = train(tmp_path, "--trainer.max_steps", "6", "--trainer.limit_val_batches", "0", "--model.fixed_num_steps", "1",
                 "--data.cot", "true", "--data.loss_on", "completion", "--data.hints", "false")
    assert {d for _, d in logged(root, "train/num_steps")} == {1.0}


def run_subprocess(tmp_path, name, *overrides):
    root = tmp_path / name
    cmd = [sys.executable, "-m", "recurrent_lm.cli", "train", "--config", DEBUG, "--trainer.default_root_dir", str(root),
           "--trainer.logger.init_args.save_dir", str(root), "--trainer.limit_val_batches", "0",
           "--trainer.callbacks.init_args.every_n_train_steps", "4", *overrides]
    return root, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  env={**os.environ, "WANDB_MODE": "disabled"})


def test_killed_run_resumes_exactly(tmp_path):
    full, process = run_subprocess(tmp_path, "full", "--trainer.max_steps", "16")
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:]

    killed, process = run_subprocess(tmp_path, "killed", "--trainer.max_steps", "16")
    checkpoint = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # mid-run, no chance to clean up
    process.wait()
    assert checkpoint.exists() and not (killed / "model").exists()
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < step < 16

    resumed, process = run_subprocess(tmp_path, "killed", "--trainer.max_steps", "16", "--ckpt_path", "last")
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:]
    a, b = load_file(full / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    for key in a:  # same data stream, same depth draws, same schedule: the same weights
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_ddp_on_two_cpu_processes(tmp_path):
    """Lightning's "ddp" strategy relaunches `rlm train` as a second process (gloo on CPU)."""
    root, process = run_subprocess(tmp_path, "ddp", "--trainer.max_steps", "6", "--trainer.strategy", "ddp",
                                   "--trainer.devices", "2")
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-3000:]
    assert (root / "model" / "model.safetensors").is_file()
    assert len(logged(root, "train/loss")) > 0


def test_misspelt_or_ill_typed_config_fields_are_named(tmp_path):
    from .test_cli import one_line_error

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  architecture:\n    num_core_layrs: 2\n")
    for args, name in [(["--model.architecture.hiden_size", "64"], "hiden_size"),  # jsonargparse's words vary
                       (["--model.learning_rate", "fast"], "--model.learning_rate: Expected a <class 'float'>"),
                       (["--data.batch_sise", "3"], "batch_sise"), (["--config", str(bad)], "num_core_layrs")]:
        one_line_error(quick_train("--trainer.default_root_dir", str(tmp_path / "run"), *args), name, "rlm train: error")
    with pytest.raises(ValueError, match="hiden_size"):  # from Python: a ValueError, as every bad input
        train(tmp_path, "--model.architecture.hiden_size", "64")


def test_resume_from_another_architecture_is_a_clear_error(tmp_path):
    root = train(tmp_path, "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0")
    with pytest.raises(ValueError, match=r"another architecture.*hidden_size"):
        train(tmp_path, "--trainer.max_steps", "8", "--trainer.limit_val_batches", "0", "--model.architecture.hidden_size", "32",
              "--ckpt_path", str(root / "checkpoints" / "last.ckpt"), name="other")


def test_print_config_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit:
        train_main(["--config", DEBUG, "--print_config"])
    assert exit.value.code == 0
    printed = capsys.readouterr().out
    assert all(key in printed for key in ("mean_backprop_depth", "learning_rate", "curriculum_batches", "max_steps"))


def test_learning_rate_schedules():
    assert lr_factor(0, 10, 100, "cosine", 0.1, 0.2) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "cosine", 0.1, 0.2) == 1.0
    assert lr_factor(100, 10, 100, "cosine", 0.1, 0.2) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, "cosine", 0.1, 0.2) == pytest.approx(0.55)
    assert lr_factor(50, 10, 100, "wsd", 0.0, 0.2) == 1.0
    assert lr_factor(90, 10, 100, "wsd", 0.0, 0.2) == pytest.approx(0.5)
    assert lr_factor(500, 10, None, "constant", 0.1, 0.2) == 1.0


def test_depth_draws_depend_only_on_seed_and_step():
    module = RecurrentLMModule({"vocab_size": 48, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                                "num_prelude_layers": 1, "num_core_layers": 1, "num_coda_layers": 1,
                                "mean_recurrence": 8, "mean_backprop_depth": 3})
    other = RecurrentLMModule(dict(module.hparams.architecture))
    draws = [module.num_steps_for(step) for step in range(50)]
    assert draws == [other.num_steps_for(step) for step in range(50)]
    assert len(set(draws)) > 3 and all(k == min(3, n + k) for n, k in draws)


RECIPES = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))


def on_this_cpu(recipe: dict, tmp_path: Path) -> list[str]:
    """The options that run a shipped recipe on this CPU at debug scale, as docs/training.md tells a user: CPU
    float32 (`--trainer.accelerator cpu --trainer.precision 32-true`), a GPU recipe's model shape at the `debug`
    preset, and local files for what the recipe reads from a cluster or the hub. The strategy stays the recipe's."""
    from recurrent_lm.commands import tokenizer_train

    trainer, model, data = recipe.get("trainer") or {}, recipe.get("model") or {}, recipe.get("data") or {}
    options = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.default_root_dir",
               str(tmp_path / "run"), "--trainer.logger", "false"]
    if trainer.get("accelerator") == "gpu" and "architecture" in model:
        options += ["--model.architecture.preset", "debug", "--model.architecture.vocab_size", "512"]
    if data.get("text_files"):
        text = tmp_path / "text.txt"
        text.write_text("a recurrent-depth model thinks in latent space before it writes a token.\n" * 200)
        tokenizer_train(str(text), tmp_path / "tokenizer", vocab_size=300, min_frequency=1)
        options += ["--data.text_files", f"[{text}]", "--data.tokenizer", str(tmp_path / "tokenizer"),
                    "--data.seq_len", "32"]
    if "init_from" in model and model["init_from"] is None:  # retrofit-llama: a retrofitted model directory
        options += ["--model.init_from", "demo-latent", "--data.tokenizer", "demo-latent"]
    if "train_files" in data:  # rlm finetune: a local model and local traces
        from recurrent_lm.commands import tasks_export

        traces = tmp_path / "traces.jsonl"
        tasks_export("chain", str(traces), difficulties="1-2", n=4, format="traces")
        options += ["--model.model", "demo-cot", "--data.train_files", f"[{traces}]", "--data.max_length", "64"]
    return options


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_builds_on_cpu_and_a_gpu_recipe_trains_a_step(name, tmp_path):
    """Code paths that only run on GPUs rot unseen here: every recipe in configs/ builds its model, data and trainer
    (the strategy included, which rlm train checks at start) on this CPU at debug scale, and the GPU recipes run a
    training step and export, so no shipped recipe names a setting the project refuses."""
    import yaml

    from recurrent_lm.train.cli import TrainCLI, build_cli, fit_and_export
    from recurrent_lm.train.data import RecurrentDataModule
    from recurrent_lm.train.finetune import FinetuneCLI, FinetuneModule, TraceDataModule

    recipe = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    argv = ["--config", name, *on_this_cpu(recipe, tmp_path)]
    finetune = "train_files" in (recipe.get("data") or {})
    classes = (FinetuneCLI, FinetuneModule, TraceDataModule) if finetune else (TrainCLI, RecurrentLMModule,
                                                                              RecurrentDataModule)
    cli = build_cli(*classes, argv, prog="rlm finetune" if finetune else "rlm train")
    assert cli.trainer.strategy is not None and cli.model is not None and cli.datamodule is not None
    fsdp2_on_old_torch = "FSDP2" in str((recipe.get("trainer") or {}).get("strategy")) and \
        torch.torch_version.TorchVersion(torch.__version__) < "2.7"  # refused there, in one line (test_parallel.py)
    if (recipe.get("trainer") or {}).get("accelerator") == "gpu" and not fsdp2_on_old_torch:
        cli = build_cli(*classes, argv + ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                                          "--overwrite", "true"], prog="rlm train")
        fit_and_export(cli, cli.model.model, cli.datamodule.tokenizer, command="rlm train")
        assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_demo_models_have_equal_unique_parameters():
    import yaml

    counts = []
    for name in ("demo-latent", "demo-cot"):
        spec = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["model"]["architecture"]
        with torch.device("meta"):
            counts.append(sum(p.numel() for p in RecurrentLMModule(spec).parameters()))
    assert counts[0] == counts[1]


# --- a run owns its directory -------------------------------------------------------------------------------------


def quick_train(*args: str):
    from .test_cli import rlm

    return rlm("train", "--config", "debug", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", *args)


def test_resuming_last_with_no_checkpoint_is_a_one_line_error(tmp_path):
    result = quick_train("--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", "last")
    assert result.returncode != 0
    assert "--ckpt_path last" in result.stderr and "no last.ckpt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_run_never_takes_another_runs_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    first = quick_train("--trainer.default_root_dir", str(root))
    assert first.returncode == 0, first.stderr
    assert (root / "model" / "model.safetensors").is_file() and not (root / "run.lock").exists()
    assert not (tmp_path / "runs").exists()  # the recipe's logger directory: logs went under the run's root
    assert list(root.glob("**/version_0/hparams.yaml"))  # the CSV logger writes under the root
    second = quick_train("--trainer.default_root_dir", str(root))
    assert second.returncode != 0 and "already holds a run" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    (root / "run.lock").write_text(str(os.getpid()))  # a live run holds it
    third = quick_train("--trainer.default_root_dir", str(root), "--ckpt_path", "last")
    assert third.returncode != 0 and f"in use by another run (pid {os.getpid()})" in third.stderr
    (root / "run.lock").write_text("999999999")  # left by a killed run: taken over
    resumed = quick_train("--trainer.default_root_dir", str(root), "--ckpt_path", "last", "--trainer.max_steps", "4")
    assert resumed.returncode == 0, resumed.stderr


def test_language_model_training_leaves_a_gate_alone():
    """objective lm: the loss never reaches the exit gate, so it is frozen (no unused parameters under DDP)."""
    module = RecurrentLMModule({"preset": "debug", "exit_gate_width": 8})
    trainable = {name for name, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and not any(name.startswith("exit_gate.") for name in trainable)


@pytest.mark.parametrize("args, message", [
    (["--trainer.max_steps", "-5"], "--trainer.max_steps must be >= 1, got -5"),
    (["--trainer.accumulate_grad_batches", "0"], "--trainer.accumulate_grad_batches must be >= 1, got 0"),
    (["--model.architecture.hidden_size", "63"],
     "model.architecture: field 'num_attention_heads': hidden_size (63) is not divisible"),
    (["--model.architecture.rope_theta", "-1"], "model.architecture: field 'rope_theta': rope_theta must be a finite"),
    (["--model.learning_rate", "fast"], "--model.learning_rate: Expected a <class 'float'>. Got value: fast"),
    (["--model.learning_rate", "-1"], "model.learning_rate must be > 0, got -1"),
    (["--data.batch_size", "0"], "data.batch_size must be >= 1, got 0"),
])
def test_bad_training_options_are_one_line_errors_naming_the_field(tmp_path, args, message):
    from .test_cli import one_line_error

    one_line_error(quick_train("--trainer.default_root_dir", str(tmp_path / "run"), *args), message)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training set anything up


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path):
    from .test_cli import one_line_error, rlm

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode()}, evil)
    for result in (quick_train("--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", str(evil)),
                   rlm("export", str(evil), str(tmp_path / "out"))):
        one_line_error(result, "evil.ckpt is not a safe checkpoint")


class RunsCode:
    def __reduce__(self):  # unpickling this would call os.system
        return (os.system, ("true",))


def test_missing_text_files_fail_before_set_up(tmp_path):
    from .test_cli import one_line_error

    from recurrent_lm.tokenization import character_tokenizer

    tokenizer = tmp_path / "tok"
    character_tokenizer("abc").save_pretrained(tokenizer)
    result = quick_train("--trainer.default_root_dir", str(tmp_path / "run"), "--data.tasks", "null",
                         "--data.text_files", "[corpus_typo]", "--data.tokenizer", str(tokenizer))
    one_line_error(result, "data files not found: ['corpus_typo']")


def test_recipes_name_their_shape_and_rebuild_the_shipped_models():
    """Shapes are written once (recurrent_lm.config.PRESETS); a recipe names one and overrides what it needs, and
    the demo recipes still build exactly the architectures of the shipped checkpoints they made."""
    import yaml

    from recurrent_lm.config import PRESETS, RecurrentConfig

    for name in ("debug", "demo-latent", "demo-cot", "demo-exit-gate", "pointer-latent", "pointer-cot", "gpu-100m",
                 "huginn-0125"):
        recipe = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["model"]
        assert recipe["architecture"]["preset"] in PRESETS, name
        # width and layers come from the preset; a recipe may fit the vocabulary, the length and the training depth,
        # and add an exit gate
        assert set(recipe["architecture"]) <= {"preset", "vocab_size", "max_position_embeddings", "mean_recurrence",
                                               "mean_backprop_depth", "exit_gate_width"}, name
    for name in ("demo-latent", "demo-cot", "demo-exit-gate", "pointer-latent", "pointer-cot"):
        recipe = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["model"]
        recipe.pop("init_from", None), recipe.pop("objective", None)  # the shape alone
        with torch.device("meta"):
            built = RecurrentLMModule(**recipe).model.config.to_dict()
        shipped = RecurrentConfig.from_pretrained(ROOT / "checkpoints" / name).to_dict()  # a field added later: default
        fields = set(dict(RecurrentLMModule(**recipe).hparams.architecture)) - {"preset"}
        assert {k: built[k] for k in fields} == {k: shipped[k] for k in fields}, name


def test_extrapolation_recipe_trains_a_few_steps(tmp_path):
    root = tmp_path / "pointer"
    train_main(["--config", str(ROOT / "configs" / "pointer-latent.yaml"), "--trainer.max_steps", "3",
                "--trainer.limit_val_batches", "0", "--data.batch_size", "8", "--trainer.log_every_n_steps", "1",
                "--trainer.default_root_dir", str(root),
                "--trainer.logger.init_args.save_dir", str(root)])
    assert (root / "model" / "model.safetensors").is_file() and len(logged(root, "train/loss")) > 0


def test_exit_gate_recipe_trains_the_gate_alone(tmp_path):
    """objective exit_gate: the shipped demo-latent model is loaded and stays as it was; only its new gate learns,
    and the exported model exits by it."""
    from recurrent_lm.answering import answer_problems
    from recurrent_lm.loading import load_model, load_tokenizer
    from recurrent_lm.tasks import get_task

    root = tmp_path / "gate"
    train_main(["--config", str(ROOT / "configs" / "demo-exit-gate.yaml"), "--trainer.max_steps", "3",
                "--trainer.limit_val_batches", "0", "--data.batch_size", "8", "--trainer.log_every_n_steps", "1",
                "--model.exit_gate_depth", "6", "--model.learning_rate", "0.05",
                "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)])
    trained, source = load_model(root / "model"), load_model(ROOT / "checkpoints" / "demo-latent")
    weights = trained.state_dict()
    assert {k for k in weights if k.startswith("exit_gate.")} == {"exit_gate.fc.weight", "exit_gate.fc.bias",
                                                                   "exit_gate.out.weight", "exit_gate.out.bias"}
    for name, value in source.state_dict().items():
        assert torch.equal(weights[name], value), name
    assert len(logged(root, "train/exit_gate_agreement")) > 0
    problems = get_task("permutation").problems(4, 4, seed=5)
    answers = answer_problems(trained, load_tokenizer(root / "model"), problems, num_steps=8, exit_criterion="gate",
                              exit_threshold=0.5, prompt_num_steps=4)
    assert all(set(a.prompt_steps) == {4} and 1 <= min(a.steps_per_token[1:]) <= 8 for a in answers)


@pytest.mark.parametrize("args, message", [
    (["--model.architecture.exit_gate_width", "0"], "set model.architecture.exit_gate_width"),
    (["--model.architecture.preset", "debug"], "another architecture"),
    (["--model.init_from", "no/such/model"], "no/such/model"),
    (["--data.tokenizer", "null"], "reads another tokenizer than the data's"),  # the task's own, grown since
    (["--model.init_from", "null"], "set model.init_from"),
])
def test_exit_gate_training_refuses_what_cannot_work(tmp_path, args, message):
    with pytest.raises((ValueError, FileNotFoundError, SystemExit), match=message):
        train_main(["--config", str(ROOT / "configs" / "demo-exit-gate.yaml"), "--trainer.max_steps", "1",
                    "--trainer.default_root_dir", str(tmp_path / "run"), *args])


def test_depth_tied_to_difficulty():
    """steps_per_difficulty: k hops train at k..k + extra_steps steps, the draw a pure function of (seed, step, k)."""
    from recurrent_lm.depth import difficulty_num_steps

    draws = {difficulty_num_steps(3, 1, 2, 3, torch.Generator().manual_seed(s)) for s in range(50)}
    assert {n + k for n, k in draws} == {3, 4, 5} and all(k == 3 for _, k in draws)
    assert difficulty_num_steps(2, 2, 0, 8) == (0, 4)
    module = RecurrentLMModule({"preset": "debug"}, steps_per_difficulty=1, extra_steps=1)
    assert module.num_steps_for(5, difficulty=4) == module.num_steps_for(5, difficulty=4)
    assert {sum(module.num_steps_for(step, difficulty=4)) for step in range(30)} == {4, 5}
    with pytest.raises(ValueError, match="data.difficulty_per_batch"):
        module.num_steps_for(0)
    with pytest.raises(ValueError, match="steps_per_difficulty"):
        RecurrentLMModule({"preset": "debug"}, steps_per_difficulty=1, fixed_num_steps=1)


def test_reward_model_recipe_trains_on_step_labels(tmp_path):
    """configs/demo-prm.yaml: step-tagged chains with labels at the tags only; the loss falls within a few steps and
    validation reports the share of step labels predicted right."""
    root = tmp_path / "prm"
    train_main(["--config", str(ROOT / "configs" / "demo-prm.yaml"), "--model.architecture.preset", "debug",
                "--trainer.max_steps", "12", "--trainer.val_check_interval", "12", "--data.batch_size", "16",
                "--model.warmup_steps", "2", "--data.val_problems_per_difficulty", "4",
                "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(root),
                "--trainer.logger.init_args.save_dir", str(root)])
    losses = [loss for _, loss in logged(root, "train/loss")]
    assert losses[-1] < 0.7 * losses[0], losses
    assert logged(root, "val/label_acc_r1")


@pytest.mark.slow
def test_a_reward_model_learns_step_labels_well_above_the_majority_rate(tmp_path):
    """A 0.2M-parameter PRM on parity chains (1-3 bits, a corrupted step in every chain): held-out step-label
    accuracy well above the constant guess of the majority label (0.53 there). 0.92 measured at 150 steps."""
    import random

    from recurrent_lm.data import heldout_problems, labelled_chain
    from recurrent_lm.tasks import get_task

    root = tmp_path / "prm"
    train_main(["--config", str(ROOT / "configs" / "demo-prm.yaml"), "--model.architecture.preset", "debug",
                "--data.tasks", "[parity]", "--data.max_difficulty", "3", "--data.val_difficulties", "[1,2,3]",
                "--data.step_error_rate", "1.0", "--data.batch_size", "32", "--trainer.max_steps", "150",
                "--model.warmup_steps", "10", "--model.learning_rate", "3e-3", "--trainer.val_check_interval", "150",
                "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)])
    problems = heldout_problems(["parity"], [1, 2, 3], 32)
    labels = [label for i, p in enumerate(problems)
              for label in labelled_chain(get_task("parity"), p, 1.0, random.Random(f"val/{i}"))[1]]
    majority = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    (_, accuracy), = logged(root, "val/label_acc_r1")
    assert accuracy > majority + 0.2, (accuracy, majority)


def test_prompt_depth_random_draws_the_prompt_its_own_depths_and_trains(tmp_path, monkeypatch):
    """model.prompt_depth random: the positions that take a loss run the step's depth, every other position a
    uniform draw in 1..r, through forward's position_depths (the KV sharing of inference)."""
    from recurrent_lm.model import RecurrentLM
    from recurrent_lm.train.module import prompt_depths

    labels = torch.full((4, 40), -100)
    labels[:, 30:] = 7  # the answer: positions 29..38 predict it
    depths = prompt_depths(labels, 6, torch.Generator().manual_seed(0))
    assert bool((depths[:, 29:39] == 6).all()) and bool((depths >= 1).all() and (depths <= 6).all())
    assert len(set(depths[:, :29].flatten().tolist())) == 6  # the prompt's depths spread over 1..6
    seen, forward = [], RecurrentLM.forward

    def recording_forward(self, *args, position_depths=None, **kwargs):
        seen.append(position_depths)
        return forward(self, *args, position_depths=position_depths, **kwargs)

    monkeypatch.setattr(RecurrentLM, "forward", recording_forward)
    root = train(tmp_path, "--model.prompt_depth", "random", "--trainer.max_steps", "3",
                 "--trainer.limit_val_batches", "0")
    assert (root / "model" / "model.safetensors").is_file()
    assert sum(d is not None and len(set(d.flatten().tolist())) > 1 for d in seen) == 3  # every training step
