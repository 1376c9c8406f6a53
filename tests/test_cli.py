"""The `rlm` command line."""

import contextlib
import io
import subprocess
import sys

import torch

from recurrent_lm import RecurrentLM
from recurrent_lm.cli import COMMANDS, main

from .conftest import HUGINN_TINY


def rlm(*args: str) -> subprocess.CompletedProcess:
    """Run `rlm ARGS` in this process (a subprocess per call would spend seconds importing torch)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(list(args))
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def test_console_command_lists_subcommands():
    result = subprocess.run(["rlm", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert all(name in result.stdout for name in COMMANDS)


def test_convert_huginn_command(tmp_path, huginn_cases):
    result = rlm("convert-huginn", str(HUGINN_TINY), str(tmp_path / "out"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    model = RecurrentLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        logits = model(huginn_cases["input_ids"], num_steps=2, init_scale=0.0).logits
    torch.testing.assert_close(logits, huginn_cases["logits_zero_state_steps_2"], atol=1e-4, rtol=0)


def test_convert_huginn_bad_source_is_one_clear_line(tmp_path):
    result = rlm("convert-huginn", str(tmp_path), str(tmp_path / "out"))
    assert result.returncode != 0
    assert "is not a Huginn checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_convert_huginn_takes_a_yaml_config(tmp_path):
    config = tmp_path / "convert.yaml"
    config.write_text(f"src: {HUGINN_TINY}\ndst: {tmp_path / 'out'}\n")
    result = rlm("convert-huginn", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def tiny_model_dir(tmp_path):
    from recurrent_lm import RecurrentConfig, character_tokenizer

    tokenizer = character_tokenizer("abcdefgh =+")
    torch.manual_seed(0)
    RecurrentLM(RecurrentConfig.preset("debug", vocab_size=len(tokenizer))).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_generate_command_prints_text_and_steps(tmp_path):
    model = tiny_model_dir(tmp_path)
    result = rlm("generate", "--model", str(model), "--prompt", "ab=", "--num-steps", "6", "--max-new-tokens", "5",
                 "--exit-criterion", "kl", "--exit-threshold", "1e-2", "--continuous-cot")
    assert result.returncode == 0, result.stderr
    text, tokens, steps, summary = result.stdout.strip().splitlines()[-4:]
    assert text.startswith("ab=") and tokens.startswith("tokens: ")
    counts = [int(item) for item in steps.removeprefix("steps per token: ").split()]
    generated = int(summary.split()[0])  # 5, or fewer if the random model writes eos early
    assert summary.startswith(f"{generated} tokens, mean") and 1 <= generated <= 5
    assert len(counts) == generated and all(1 <= c <= 6 for c in counts)


def test_generate_command_speculative(tmp_path):
    model = tiny_model_dir(tmp_path)
    result = rlm("generate", "--model", str(model), "--prompt", "ab=", "--num-steps", "4", "--draft-steps", "2",
                 "--max-new-tokens", "6", "--init-scale", "0")
    assert result.returncode == 0, result.stderr
    assert "draft acceptance rate" in result.stdout


def test_generate_command_bad_input(tmp_path):
    model = tiny_model_dir(tmp_path)
    for args, message in [
        (["--num-steps", "4", "--draft-steps", "5"], "draft_steps (5) > verify steps"),
        (["--exit-criterion", "kl", "--exit-threshold", "0"], "threshold must be > 0"),
        (["--num-steps", "2", "--exit-criterion", "kl", "--min-steps", "3"], "min_steps (3) > max steps"),
        (["--max-new-tokens", "0"], "--max_new_tokens must be >= 1, got 0"),
        (["--max-new-tokens", "1000"], "exceeds the model's max_position_embeddings"),
    ]:
        result = rlm("generate", "--model", str(model), "--prompt", "ab", *args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
    result = rlm("generate", "--model", str(model), "--prompt", "xyz")
    assert result.returncode != 0 and "outside the tokenizer's alphabet" in result.stderr
    result = rlm("generate", "--model", str(HUGINN_TINY), "--prompt", "ab")
    assert result.returncode != 0 and "convert it first" in result.stderr


# --- bad input: one line that names the problem -------------------------------------------------------------------


def one_line_error(result, *fragments):
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_bad_generation_and_sweep_input_gets_one_line(tmp_path):
    model = tiny_model_dir(tmp_path)
    one_line_error(rlm("generate", "--model", str(model), "--prompt", "ab", "--do-sample", "--top-p", "2"),
                   "--top_p must be in (0, 1]")
    one_line_error(rlm("generate", "--model", str(model), "--prompt", "ab", "--num-steps", "1000000000"),
                   "--num_steps must be in [1, 100000], got 1000000000")
    one_line_error(rlm("sweep", "--model", "demo-latent", "--task", "permutation", "--steps", "1,x",
                       "--out", str(tmp_path / "s1")), "--steps: '1,x' is not a list of integers")
    one_line_error(rlm("sweep", "--model", "demo-latent", "--task", "permutation", "--steps", "1-200000000",
                       "--out", str(tmp_path / "s2")), "--steps", "more than 10000 values")
    empty = rlm("generate", "--model", str(model), "--prompt", "", "--max-new-tokens", "2", "--init-scale", "0")
    assert empty.returncode == 0, empty.stderr  # an empty prompt is bos alone: the model continues from it


def test_bad_tensors_are_named(tiny_model):
    import pytest

    with pytest.raises(ValueError, match="integer token ids"):
        tiny_model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="holds no tokens"):
        tiny_model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(1, 4\)"):
        tiny_model(torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 3, dtype=torch.long))


def test_broken_or_pickled_weights_are_named(tmp_path):
    import os
    import stat

    model = tiny_model_dir(tmp_path)
    mode = stat.S_IMODE(os.stat(model / "model.safetensors").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # weights as readable as the rest of the directory
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    one_line_error(rlm("generate", "--model", str(model), "--prompt", "ab"), "model.safetensors",
                   "not a readable safetensors file")
    weights.unlink()
    torch.save({"weights": torch.zeros(2)}, model / "pytorch_model.bin")
    one_line_error(rlm("generate", "--model", str(model), "--prompt", "ab"), "only pickled pytorch_model.bin",
                   "never unpickles")


def test_generation_shows_progress_per_generated_token(tmp_path):
    from recurrent_lm.commands import TokenProgress

    model, ticks = RecurrentLM.from_pretrained(tiny_model_dir(tmp_path)).eval(), []
    for settings in (dict(), dict(draft_steps=1, draft_length=2)):
        progress = TokenProgress(6)
        progress.bar.update = ticks.append
        out = model.generate(torch.ones(1, 3, dtype=torch.long), num_steps=2, max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, init_scale=0.0, streamer=progress, **settings)
        assert sum(ticks) == out.shape[1] - 3 if isinstance(out, torch.Tensor) else out.sequences.shape[1] - 3
        ticks.clear()


def test_generate_feeds_a_shipped_model_the_bos_it_was_trained_with():
    result = rlm("generate", "--model", "demo-latent", "--prompt", "02431.31420.12403?", "--num-steps", "4",
                 "--init-scale", "0", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-4] == "02431.31420.12403?03142<eos>"  # 40123 without bos


# The commands that train: their --help is Lightning's own parser (LightningCLI), and Lightning imports matplotlib
# whenever it is installed (torchmetrics' plotting helpers); no other command waits for either.
TRAINING_COMMANDS = {"train", "finetune", "demo"}
HEAVY = ("torch", "lightning", "matplotlib")


def heavy_modules_loaded(*code_lines: str) -> list[list[str]]:
    """For each snippet, run in a fresh interpreter, the heavy modules it left loaded (all snippets at once)."""
    report = f"import sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    runs = [subprocess.Popen([sys.executable, "-c", f"{line}\n{report}"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for line in code_lines]
    loaded = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-1000:]
        loaded.append(eval(out.strip().splitlines()[-1]))
    return loaded


def test_start_up_imports_only_what_the_command_needs():
    """`rlm --help` and `import recurrent_lm` load neither torch, Lightning nor matplotlib; `rlm CMD --help` loads
    Lightning (and with it matplotlib) only for the commands that train, and matplotlib for no other command; the
    one-line help of each command is its function's docstring's first line, read without importing it."""
    import inspect

    from recurrent_lm.cli import HELP, OWN_PARSER, command_function

    def entries(commands, prefix=""):
        for name, entry in commands.items():
            yield from entries(entry, f"{prefix}{name} ") if isinstance(entry, dict) else [(prefix + name, entry[0])]

    commands = dict(entries(COMMANDS))
    for name, target in commands.items():  # the help line is the docstring's first line
        assert HELP[name] == inspect.getdoc(command_function(target)).split("\n")[0], name
    one_per_module = {target.partition(":")[0]: name for name, target in commands.items()}  # same imports
    names = [""] + list(one_per_module.values()) + list(OWN_PARSER)
    help_of = "from recurrent_lm.cli import main\ntry: main({!r} + ['--help'])\nexcept SystemExit: pass"
    loaded = heavy_modules_loaded("import recurrent_lm", *(help_of.format(name.split()) for name in names))
    assert loaded[0] == [], "import recurrent_lm"
    assert loaded[1] == [], "rlm --help"
    for name, modules in zip(names[1:], loaded[2:]):
        expected = ["lightning", "matplotlib", "torch"] if name in TRAINING_COMMANDS else ["torch"]
        assert modules == expected, f"rlm {name} --help loaded {modules}"
