"""One output rule for every command that writes (recurrent_lm.outputs): the target's shape, earlier content,
inputs, live runs, atomic writes; and Ctrl-C keeping what finished."""

import json
import os
import subprocess
import sys

import pytest

from recurrent_lm.eval.methods import Method
from recurrent_lm.outputs import Interrupted, claimed_output

from .test_cli import one_line_error, rlm
from .test_train import DEBUG

SWEEP = ("sweep", "--model", "demo-latent", "--task", "permutation", "--difficulties", "1", "--steps", "1,2",
         "--n", "2", "--exit_criteria", "[]", "--dynamics", "0")


def leftovers(folder):
    """Temporary or lock files that a command left beside its outputs."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_target_of_the_wrong_shape_is_named(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(NotADirectoryError, match="--out .*a-file is a file; give a folder"):
        with claimed_output(tmp_path / "a-file", option="--out"):
            pass
    with pytest.raises(IsADirectoryError, match="--out .*a-folder is a folder; give a file path"):
        with claimed_output(tmp_path / "a-folder", option="--out", kind="file"):
            pass
    with pytest.raises(NotADirectoryError, match="a-file is a file, not a folder"):
        with claimed_output(tmp_path / "a-file" / "below", option="--out"):
            pass


def test_overwrite_replaces_the_target_whole_and_nothing_is_written_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.json").write_text("old")
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass --overwrite"):
        with claimed_output(target, option="--out"):
            pass
    with pytest.raises(RuntimeError):  # a failing command: the earlier content stays, no temporary file remains
        with claimed_output(target, option="--out", overwrite=True) as output:
            (output.path / "half.json").write_text("half")
            raise RuntimeError("failed half-way")
    assert sorted(p.name for p in target.iterdir()) == ["stale.json"] and leftovers(tmp_path) == []
    with claimed_output(target, option="--out", overwrite=True) as output:
        (output.path / "new.json").write_text("new")
        assert not (target / "new.json").exists()  # nothing at the target before the command finished
    assert sorted(p.name for p in target.iterdir()) == ["new.json"] and leftovers(tmp_path) == []


def test_an_output_is_never_an_input(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("{}\n")
    with pytest.raises(ValueError, match="is one of this command's inputs"):
        with claimed_output(pool, option="--out", kind="file", overwrite=True, inputs=[pool]):
            pass
    with pytest.raises(ValueError, match="holds one of this command's inputs"):
        with claimed_output(tmp_path, option="--out", overwrite=True, inputs=[pool]):
            pass
    assert pool.read_text() == "{}\n"


def refused_while_a_live_process_holds(tmp_path, lock_text: str, holder: str, command: str) -> int:
    """Claim tmp_path/out while its lock names a live process (`lock_text` with {pid}); that process's pid, dead
    by the time this returns."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".out.lock").write_text(lock_text.format(pid=live.pid))
        with pytest.raises(FileExistsError, match=f"in use by another {holder} \\(pid {live.pid}\\)"):
            with claimed_output(tmp_path / "out", option="--out", command=command):
                pass
    finally:
        live.kill()
        live.wait()
    return live.pid


def test_a_target_held_by_a_live_run_is_refused_and_a_dead_runs_leftovers_are_taken_over(tmp_path):
    target = tmp_path / "out"
    # a lock of an older release holds a pid alone
    dead = refused_while_a_live_process_holds(tmp_path, "{pid}", "run", command="rlm sweep")
    # its lock and its staging folder are left behind, as after a kill
    (tmp_path / f".out.{dead}.partial").mkdir()
    with claimed_output(target, option="--out") as output:
        (output.path / "results.json").write_text("{}")
    assert (target / "results.json").is_file() and leftovers(tmp_path) == []


def test_commands_refuse_to_write_over_data(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text("{}")
    pool = tmp_path / "pool.jsonl"
    assert rlm("tasks", "export", "chain", str(pool), "--format", "traces", "--n", "2").returncode == 0
    before = pool.read_text()
    one_line_error(rlm("select-traces", "--pool", str(pool), "--out", str(pool), "--n", "1", "--overwrite", "true"),
                   "is one of this command's inputs")
    one_line_error(rlm("tasks", "export", "chain", str(pool)), "already exists and is not empty; pass --overwrite")
    assert pool.read_text() == before
    one_line_error(rlm("tasks", "export", "chain", str(tmp_path)), "is a folder; give a file path")
    one_line_error(rlm("tokenizer", "train", "--files", str(pool), "--out", str(pool)), "is a file; give a folder")
    one_line_error(rlm("tokenizer", "tasks", "--out", str(model)), "already exists and is not empty")
    one_line_error(rlm(*SWEEP, "--out", str(pool)), "--out", "is a file; give a folder")
    one_line_error(rlm("convert-huginn", str(pool), str(tmp_path / "h")), "is a file; give the Huginn checkpoint")
    assert leftovers(tmp_path) == []


def test_a_second_sweep_into_the_same_folder_is_refused_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "sweep"
    first = rlm(*SWEEP, "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert json.loads((out / "results.json").read_text())["complete"] is True
    (out / "stale.txt").write_text("from an earlier run")
    one_line_error(rlm(*SWEEP, "--out", str(out)), "already exists and is not empty; pass --overwrite")
    again = rlm(*SWEEP, "--out", str(out), "--overwrite")
    assert again.returncode == 0, again.stderr
    assert not (out / "stale.txt").exists() and (out / "results.json").is_file() and leftovers(tmp_path) == []


def test_export_refuses_another_models_folder_and_a_file(tmp_path):
    from .test_train import train

    root = train(tmp_path, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")
    checkpoint = root / "checkpoints" / "last.ckpt"
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "manifest.json").write_text('{"config": "another model"}')
    one_line_error(rlm("export", str(checkpoint), str(other)), "already exists and is not empty; pass --overwrite")
    assert (other / "manifest.json").is_file()
    (tmp_path / "a-file").write_text("")
    one_line_error(rlm("export", str(checkpoint), str(tmp_path / "a-file")), "is a file; give a folder")
    one_line_error(rlm("export", str(checkpoint), str(root / "checkpoints"), "--overwrite"),
                   "holds one of this command's inputs")
    empty = tmp_path / "empty.ckpt"
    empty.write_text("")
    one_line_error(rlm("export", str(empty), str(tmp_path / "m")), "is not a checkpoint")
    replaced = rlm("export", str(checkpoint), str(other), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert not (other / "manifest.json").exists() and (other / "model.safetensors").is_file()  # replaced whole


class InterruptedAfter(Method):
    """A method whose second cell is interrupted, as by Ctrl-C."""

    name, budgets = "fake", [1, 2, 3]

    def run(self, problems, budget):
        if budget == 2:
            raise KeyboardInterrupt
        return [{"method": self.name, "setting": f"b={budget}", "difficulty": problems[0].difficulty, "n": 1}]


def test_ctrl_c_in_a_sweep_keeps_the_finished_cells_and_exits_130(tmp_path, monkeypatch):
    import recurrent_lm.eval.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "LatentDepth", lambda *args: InterruptedAfter())
    out = tmp_path / "sweep"
    result = rlm(*SWEEP, "--out", str(out))
    assert result.returncode == 130
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1] == (
        f"rlm sweep: interrupted: kept the 1 of 3 cells that finished in {out / 'results.json'} (\"complete\": "
        "false); rerun with --overwrite for the whole result")
    kept = json.loads((out / "results.json").read_text())
    assert kept["complete"] is False and [r["setting"] for r in kept["rows"]] == ["b=1"]
    assert "wrote" not in result.stdout and not (out / "summary.md").exists() and leftovers(tmp_path) == []


def test_ctrl_c_in_training_keeps_the_last_checkpoint_exports_nothing_and_exits_130(tmp_path):
    root = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "recurrent_lm.cli", "train", "--config", DEBUG, "--trainer.max_steps", "50",
         "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
         "--trainer.callbacks", json.dumps([
             {"class_path": "tests.interrupt.InterruptAt", "init_args": {"step": 6}},
             {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
              "init_args": {"save_last": True, "every_n_train_steps": 4}}])],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
        env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 130, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"rlm train: interrupted: at step 6 of 50; the last checkpoint, {root / 'checkpoints' / 'last.ckpt'}, "
                    "is kept: resume with --ckpt_path last; nothing was exported")
    assert (root / "checkpoints" / "last.ckpt").is_file() and not (root / "model").exists()
    assert not (root / "run.lock").exists() and leftovers(root) == []


def test_interrupted_is_a_keyboard_interrupt():
    assert issubclass(Interrupted, KeyboardInterrupt)  # code that catches Ctrl-C catches it too


def test_training_overwrite_replaces_an_earlier_run(tmp_path):
    from .test_train import quick_train

    root = tmp_path / "run"
    assert quick_train("--trainer.default_root_dir", str(root)).returncode == 0
    (root / "checkpoints" / "stale.ckpt").write_text("an earlier run's")
    export = tmp_path / "elsewhere"
    export.mkdir()
    (export / "keep.txt").write_text("not this run's")
    refused = quick_train("--trainer.default_root_dir", str(tmp_path / "new"), "--export_dir", str(export))
    one_line_error(refused, "--export_dir", "already exists and is not empty")
    assert not (tmp_path / "new" / "checkpoints").exists()  # refused before training
    again = quick_train("--trainer.default_root_dir", str(root), "--overwrite", "true")
    assert again.returncode == 0, again.stderr
    assert not (root / "checkpoints" / "stale.ckpt").exists() and (root / "model" / "model.safetensors").is_file()
    assert leftovers(root) == []


def test_ctrl_c_in_compare_keeps_the_finished_cells(tmp_path, monkeypatch):
    import recurrent_lm.eval.compare as compare_module

    monkeypatch.setattr(compare_module, "LatentDepth", lambda *args: InterruptedAfter())
    out = tmp_path / "compare"
    result = rlm("compare", "--latent", "demo-latent", "--cot", "demo-cot", "--task", "permutation", "--difficulties",
                 "1", "--n", "2", "--methods", "latent", "--exit_criterion", "none", "--votes", "", "--out", str(out))
    assert result.returncode == 130 and "rlm compare: interrupted: kept the 1 of 3 cells" in result.stderr
    kept = json.loads((out / "results.json").read_text())
    assert kept["complete"] is False and kept["methods"] == ["latent"] and len(kept["rows"]) == 1


def test_ctrl_c_in_the_demo_keeps_the_finished_studies(tmp_path, monkeypatch):
    import recurrent_lm.eval.demo as demo_module

    def run_study(study, out, *args):
        if study.name != demo_module.STUDIES[0].name:
            raise KeyboardInterrupt
        (out / study.name).mkdir()
        return {"findings": ["measured"]}

    monkeypatch.setattr(demo_module, "run_study", run_study)
    out = tmp_path / "demo"
    result = rlm("demo", "--out", str(out))
    assert result.returncode == 130
    assert f"rlm demo: interrupted: kept the 1 of {len(demo_module.STUDIES)} studies" in result.stderr
    kept = json.loads((out / "results.json").read_text())
    assert kept["complete"] is False and list(kept["studies"]) == [demo_module.STUDIES[0].name]
    assert not (out / "report.md").exists() and leftovers(tmp_path) == []


def test_outputs_inside_an_input_a_link_or_the_current_folder_are_refused(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_text("weights")
    with pytest.raises(ValueError, match="lies inside one of this command's inputs"):
        with claimed_output(model / "model.safetensors", option="--out", kind="file", overwrite=True,
                            inputs=[model]):
            pass
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match="is a symbolic link"):
        with claimed_output(tmp_path / "link", option="--out", overwrite=True):
            pass
    monkeypatch.chdir(model)
    for here in (".", "sub/..", ".."):
        with pytest.raises(ValueError, match="is the current folder or holds it"):
            with claimed_output(here, option="--out", overwrite=True):
                pass
    with pytest.raises(IsADirectoryError, match="names a folder \\(it ends in /\\)"):
        with claimed_output(str(tmp_path / "new") + "/", option="--out", kind="file"):
            pass
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]


def test_a_lock_names_the_command_that_holds_it(tmp_path):
    refused_while_a_live_process_holds(tmp_path, "{pid} rlm sweep", "rlm sweep", command="rlm compare")


def test_a_swap_that_fails_leaves_the_target_and_no_staging(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.json").write_text("old")
    real_replace = os.replace

    def refused(src, dst):
        if str(src).endswith(".partial"):
            raise PermissionError(f"[Errno 1] Operation not permitted: {src!r} -> {dst!r}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError):
        with claimed_output(target, option="--out", overwrite=True) as output:
            (output.path / "new.json").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["old.json"] and leftovers(tmp_path) == []


def test_training_never_exports_over_its_inputs_or_its_own_run(tmp_path):
    from .test_train import quick_train

    root = tmp_path / "run"
    one_line_error(quick_train("--trainer.default_root_dir", str(root), "--export_dir", str(root)),
                   "is (or holds) the run's own directory")
    model = tmp_path / "start"
    assert quick_train("--trainer.default_root_dir", str(tmp_path / "first"), "--export_dir", str(model)).returncode == 0
    one_line_error(quick_train("--trainer.default_root_dir", str(tmp_path / "second"), "--model.init_from", str(model),
                               "--data.tokenizer", str(model), "--export_dir", str(model), "--overwrite", "true"),
                   "is one of this command's inputs")
    assert (model / "model.safetensors").is_file()


def test_an_interrupted_overwrite_keeps_the_earlier_result(tmp_path, monkeypatch):
    import recurrent_lm.eval.sweep as sweep_module

    out = tmp_path / "sweep"
    assert rlm(*SWEEP, "--out", str(out)).returncode == 0
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(sweep_module, "LatentDepth", lambda *args: InterruptedAfter())
    result = rlm(*SWEEP, "--out", str(out), "--overwrite")
    kept = tmp_path / f"sweep.interrupted-{os.getpid()}"
    assert result.returncode == 130 and f"finished in {kept / 'results.json'}" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == before and json.loads((out / "results.json").read_text())["complete"]
    assert json.loads((kept / "results.json").read_text())["complete"] is False


def test_resuming_a_run_that_is_already_past_max_steps_is_refused(tmp_path):
    from .test_train import quick_train

    root = tmp_path / "run"
    assert quick_train("--trainer.default_root_dir", str(root), "--trainer.max_steps", "4").returncode == 0
    one_line_error(quick_train("--trainer.default_root_dir", str(root), "--ckpt_path", "last"),
                   "the checkpoint is at step 4, --trainer.max_steps is 2: nothing is left to train")


def test_a_pipe_or_device_is_never_written_over(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    one_line_error(rlm("tasks", "export", "chain", str(fifo), "--n", "2", "--overwrite"),
                   "is not a regular file or folder (a device, pipe or socket)")
    one_line_error(rlm("tasks", "export", "chain", os.devnull, "--n", "2", "--overwrite"), "is not a regular file")
    assert not fifo.is_file() and not os.path.isfile(os.devnull)
