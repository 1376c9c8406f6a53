"""Every numeric option has a documented range (recurrent_lm.options), refused before any work when outside it;
config files and option values that a parser would turn into a traceback are one line."""

import inspect
import json
import typing

import pytest

from recurrent_lm.cli import COMMANDS, command_function
from recurrent_lm.options import Range, check_number, parse_range, ranges

from .test_cli import one_line_error, rlm

NUMBERS = (int, float)


def commands(entries=COMMANDS, prefix=""):
    for name, entry in entries.items():
        if isinstance(entry, dict):
            yield from commands(entry, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command_function(entry[0])


def numeric(annotation) -> bool:
    """int, float, their Optional forms and lists of them (bool is no number here; a list option that also takes
    text, recurrent_lm.tasks.IntList, is checked by parse_int_list)."""
    if annotation in NUMBERS:
        return True
    if str in typing.get_args(annotation) or any(str in typing.get_args(arg) for arg in typing.get_args(annotation)):
        return False
    return any(numeric(arg) for arg in typing.get_args(annotation) if arg is not type(None))


def option_takers():
    """Every command function, and the classes whose __init__ options `rlm train` and `rlm finetune` take."""
    from recurrent_lm.train.data import RecurrentDataModule
    from recurrent_lm.train.finetune import FinetuneModule, TraceDataModule
    from recurrent_lm.train.module import RecurrentLMModule

    yield from commands()
    for cls in (RecurrentLMModule, RecurrentDataModule, FinetuneModule, TraceDataModule):
        yield cls.__name__, cls


@pytest.mark.parametrize("name,taker", list(option_takers()), ids=[name for name, _ in option_takers()])
def test_every_numeric_option_has_a_documented_range(name, taker):
    function = taker.__init__ if isinstance(taker, type) else taker
    declared = getattr(function, "option_ranges", {})
    options = [p for p, parameter in inspect.signature(function).parameters.items() if numeric(parameter.annotation)]
    assert sorted(options) == sorted(declared), f"{name}: options without a range: {set(options) - set(declared)}"
    doc = inspect.getdoc(taker)
    for option, allowed in declared.items():
        assert f"(range: {str(allowed).removeprefix('in ')})" in doc, f"{name} --{option}: its range is not in --help"


def test_ranges_parse_hold_and_print():
    assert parse_range(">= 1") == Range(low=1) and str(Range(low=1)) == ">= 1"
    assert str(parse_range("(0, 1]")) == "in (0, 1]"
    assert parse_range("(0, 1]").holds(1) and not parse_range("(0, 1]").holds(0)
    assert parse_range("> 0").holds(1e-9) and not parse_range("> 0").holds(0)
    with pytest.raises(ValueError, match="--top_p must be a finite number in \\(0, 1\\], got nan"):
        check_number("top_p", float("nan"), parse_range("(0, 1]"))
    with pytest.raises(ValueError, match="--thresholds must be a finite number >= 0, got inf"):
        check_number("thresholds", [0.1, float("inf")], parse_range(">= 0"))
    check_number("n", None, parse_range(">= 1"))  # None is the default, never a value out of range


def test_a_range_is_checked_from_python_too():
    @ranges(n=">= 1")
    def count(n: int = 3) -> int:
        """Count.

        Args:
            n: how many.
        """
        return n

    assert count() == 3 and count(n=5) == 5
    with pytest.raises(ValueError, match="--n must be >= 1, got 0"):
        count(0)
    assert "n: how many. (range: >= 1)" in count.__doc__

    @ranges("model.", rate="(0, 1]")
    class Module:
        """A module.

        Args:
            rate: a rate.
        """

        def __init__(self, rate: float = 0.5):
            self.rate = rate

    assert Module().rate == 0.5 and "rate: a rate. (range: (0, 1])" in Module.__doc__
    with pytest.raises(ValueError, match="--model.rate must be in \\(0, 1\\], got 2"):
        Module(rate=2)
    with pytest.raises(TypeError, match="no options"):
        ranges(m=">= 1")(count)


@pytest.mark.parametrize("args,message", [
    (("sweep", "--model", "demo-latent", "--task", "chain", "--adaptive_max_steps", "0"),
     "--adaptive_max_steps must be in [1, 100000], got 0"),
    (("sweep", "--model", "demo-latent", "--task", "chain", "--dynamics", "-1"), "--dynamics must be >= 0, got -1"),
    (("sweep", "--model", "demo-latent", "--task", "chain", "--batch_size", "0"), "--batch_size must be >= 1, got 0"),
    (("sweep", "--model", "demo-latent", "--task", "chain", "--exit_prompt_steps", "-1"),
     "--exit_prompt_steps must be in [1, 100000], got -1"),
    (("sweep", "--model", "demo-latent", "--task", "chain", "--difficulties", "8-1"),
     "--difficulties: '8-1' is a descending range; write 1-8"),
    (("sweep", "--model", "demo-latent", "--task", "chain", "--exit_thresholds", "[0.1, -1]"),
     "--exit_thresholds must be > 0, got -1"),
    (("sweep", "--model", "demo-latent", "--task", "chain", "--n", "x"), "--n: Expected a <class 'int'>. Got value: x"),
    (("sweep", "--model", "demo-latent", "--task", "chain", "--adaptive_max_steps", "x"),
     "--adaptive_max_steps: Expected a <class 'int'>, got x"),
    (("tasks", "sample", "chain", "--n", "-1"), "--n must be in [1, 1000000], got -1"),
    (("generate", "--model", "demo-latent", "--prompt", "a", "--init_scale", "-5"), "--init_scale must be >= 0, got -5"),
    (("generate", "--model", "demo-latent", "--prompt", "a", "--temperature", "nan"),
     "--temperature: must be a finite number, got nan"),
    (("generate", "--model", "demo-latent", "--prompt", "a", "--temperature", "0"), "--temperature must be > 0, got 0"),
    (("generate", "--model", "demo-latent", "--prompt", "a", "--min_steps", "100", "--num_steps", "4"),
     "min_steps (100) > max steps (num_steps = 4)"),
    (("compare", "--latent", "demo-latent", "--cot", "demo-cot", "--task", "chain", "--beam_width", "0"),
     "--beam_width must be >= 1, got 0"),
    (("train", "--config", "debug", "--trainer.max_steps", "0"), "--trainer.max_steps must be >= 1"),
])
def test_out_of_range_options_are_refused_before_any_work(args, message, tmp_path):
    result = rlm(*args, *(["--out", str(tmp_path / "out")] if args[0] in ("sweep", "compare") else []))
    one_line_error(result, message)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_exit_criterion_none_is_what_the_help_says(tmp_path):
    out = tmp_path / "compare"
    result = rlm("compare", "--latent", "demo-latent", "--cot", "demo-cot", "--task", "permutation",
                 "--difficulties", "1", "--n", "2", "--steps", "1", "--budgets", "0", "--votes", "",
                 "--methods", "latent", "--exit_criterion", "none", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "latent-exit" not in (out / "results.csv").read_text()


def test_bad_config_and_problem_files_are_named(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    sweep = ("sweep", "--model", "demo-latent", "--out", str(tmp_path / "out"))
    one_line_error(rlm(*sweep, "--config", str(binary)), f"--config {binary} is not a text file")
    one_line_error(rlm(*sweep, "--config", str(empty)), f"--config {empty} holds nothing, not a mapping of options")
    one_line_error(rlm(*sweep, "--config", str(listed)), f"--config {listed} holds a list")
    one_line_error(rlm("train", "--config", str(empty)), f"--config {empty} holds nothing")
    one_line_error(rlm(*sweep, "--config", str(tmp_path)), f"--config {tmp_path} is a folder")
    problems = tmp_path / "problems.jsonl"
    problems.write_bytes(bytes(range(256)))
    one_line_error(rlm(*sweep, "--problems", str(problems)), f"problem file {problems} is not UTF-8 text")
    assert not (tmp_path / "out").exists()


def test_unknown_lm_eval_tasks_are_named():
    pytest.importorskip("lm_eval")
    one_line_error(rlm("lm-eval", "--model", "demo-latent", "--tasks", "no_such_task_xyz"),
                   "--tasks: unknown lm-eval tasks ['no_such_task_xyz']")


@pytest.mark.parametrize("args,message", [
    (("tasks", "export", "chain", "OUT", "--difficulties", "2,2,2"), "--difficulties: '2,2,2' gives 2 twice"),
    (("tasks", "export", "chain", "OUT", "--difficulties", ""), "--difficulties: '' holds no values"),
    (("sweep", "--model", "demo-latent", "--task", "chain", "--steps", "4,4,1"), "--steps: '4,4,1' gives 4 twice"),
    (("sweep", "--model", "demo-latent", "--task", "chain", "--n", "1000000000"), "--n must be in [1, 1000000]"),
    (("sweep", "--model", "demo-latent", "--task", "chain", "--adaptive_max_steps", "1000000000"),
     "--adaptive_max_steps must be in [1, 100000]"),
    (("generate", "--model", "demo-latent", "--prompt", "a", "--exit_criterion", "kl", "--exit_threshold", "0"),
     "--exit_threshold must be > 0, got 0"),
    (("sweep", "--model", "demo-latent", "--task", "chain", "--exit_thresholds", "[1e400]"),
     "--exit_thresholds must be a finite number > 0, got inf"),
    (("tokenizer", "train", "--files", "x", "--out", "OUT", "--vocab_size", "99999999999"),
     "--vocab_size must be in [261, 1048576]"),
    (("train", "--config", "debug", "--trainer.val_check_interval", "0"), "--trainer.val_check_interval must be > 0"),
    (("train", "--config", "debug", "--trainer.log_every_n_steps", "-3"), "--trainer.log_every_n_steps must be >= 1"),
])
def test_lists_and_bounds_are_refused_before_any_work(args, message, tmp_path):
    args = tuple(str(tmp_path / "out") if a == "OUT" else a for a in args)
    extra = ["--out", str(tmp_path / "out")] if args[0] == "sweep" else []
    extra += ["--trainer.default_root_dir", str(tmp_path / "out")] if args[0] == "train" else []
    one_line_error(rlm(*args, *extra), message)
    assert not (tmp_path / "out").exists()


def test_config_files_with_aliases_or_sections_of_the_wrong_kind_are_named(tmp_path):
    aliases = tmp_path / "aliases.yaml"
    aliases.write_text("a: &a [1, 2]\nb: [*a, *a]\n")
    one_line_error(rlm("sweep", "--config", str(aliases), "--model", "demo-latent"), "aliases (*a) are not accepted")
    section = tmp_path / "section.yaml"
    section.write_text("trainer: 5\n")
    one_line_error(rlm("train", "--config", str(section)), f"--config {section}: trainer must be a mapping")


def test_ctrl_c_while_rlm_starts_is_one_line():
    """Ctrl-C after the `rlm` script has started importing the package, before main() runs: one line, exit 130.
    The signal is sent from inside, right after the import, so that no machine is too fast for the window."""
    import subprocess
    import sys

    # as from a terminal: a test run in the background inherits an ignored SIGINT, and Python then keeps it so
    code = ("import os, signal, sys, time; sys.argv[0] = 'rlm'; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "import recurrent_lm; os.kill(os.getpid(), signal.SIGINT); time.sleep(60)")
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert process.returncode == 130 and process.stderr.strip().splitlines()[-1] == "rlm: interrupted while starting"


@pytest.mark.parametrize("args,message", [
    (("sweep", "--model", "demo-latent", "--task", "chain", "--exit_thresholds", "[]"),
     "--exit_thresholds []: give thresholds, leave the option out for the default grid"),
    (("sweep", "--model", "demo-latent", "--task", "chain", "--steps", "-3"), "--steps must all be >= 1"),
    (("tokenizer", "train", "--files", "x", "--out", "OUT", "--vocab_size", "50"), "--vocab_size must be in [261,"),
])
def test_more_options_are_refused_before_any_work(args, message, tmp_path):
    test_lists_and_bounds_are_refused_before_any_work(args, message, tmp_path)


def test_list_options_take_yaml_numbers_and_lists(tmp_path):
    from recurrent_lm.tasks import parse_int_list

    assert parse_int_list(4) == [4] and parse_int_list([1, 2]) == [1, 2] and parse_int_list("1-3") == [1, 2, 3]
    config = tmp_path / "sweep.yaml"
    config.write_text("steps: 1\ndifficulties: [1, 2]\n")
    result = rlm("sweep", "--config", str(config), "--model", "demo-latent", "--task", "permutation", "--n", "2",
                 "--exit_criteria", "[]", "--dynamics", "0", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "results.json").read_text())["difficulties"] == [1, 2]


def test_a_folder_given_as_a_data_file_is_named(tmp_path):
    from recurrent_lm.data import text_source

    with pytest.raises(IsADirectoryError, match="are folders; give the files in them"):
        text_source([str(tmp_path)])


def test_repeats_and_unknown_config_keys_of_nested_commands_are_named(tmp_path):
    one_line_error(rlm("tasks", "export", "chain,chain", str(tmp_path / "x.jsonl")), "names a task twice")
    config = tmp_path / "unknown.yaml"
    config.write_text("nosuch_option: 1\n")
    one_line_error(rlm("tasks", "export", "chain", str(tmp_path / "y.jsonl"), "--config", str(config)),
                   "rlm tasks export has no options ['nosuch_option']")
    one_line_error(rlm("train", "--config", "debug", "--model.eval_depths", "[4,4]",
                       "--trainer.default_root_dir", str(tmp_path / "run")), "gives a depth twice")
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "run").exists()


def test_repeated_yaml_keys_pools_and_folders_given_as_files_are_named(tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text("trainer:\n  max_steps: 1\ntrainer:\n  max_steps: 2\n")
    one_line_error(rlm("train", "--config", str(config)), "the key 'trainer' is given twice")
    pool = tmp_path / "pool.jsonl"
    assert rlm("tasks", "export", "chain", str(pool), "--n", "2", "--format", "traces").returncode == 0
    one_line_error(rlm("select-traces", "--pool", f"{pool},{pool}", "--out", str(tmp_path / "s.jsonl")),
                   "are given twice; give each once")
    one_line_error(rlm("export", str(tmp_path), str(tmp_path / "m")), "is a folder: give a .ckpt file")
    problems = tmp_path / "problems.jsonl"
    assert rlm("tasks", "export", "parity", str(problems), "--n", "1", "--difficulties", "1").returncode == 0
    one_line_error(rlm("sweep", "--model", "demo-latent", "--problems", str(problems), "--difficulties", "5",
                       "--out", str(tmp_path / "sw")), "holds difficulties [1], none of --difficulties [5]")


def test_empty_items_non_finite_floats_and_files_given_as_folders_are_named(tmp_path):
    one_line_error(rlm("tasks", "export", "chain", str(tmp_path / "p.jsonl"), "--difficulties", "1,,2"),
                   "has an empty item")
    one_line_error(rlm("generate", "--model", "demo-latent", "--prompt", "0", "--temperature", "nan"),
                   "--temperature: must be a finite number, got nan")
    one_line_error(rlm("tasks", "export", "chain", ""), "OUT is empty; give a path to write")
    one_line_error(rlm("sweep", "--model", "demo-latent", "--task", "chain", "--exit_thresholds", "0.5,1.5",
                       "--out", str(tmp_path / "s")), "write a list in brackets, e.g. [0.5, 1.5]")
    config = tmp_path / "config.json"
    config.write_text("{}")
    one_line_error(rlm("generate", "--model", str(config), "--prompt", "0"), "is a file, not a model directory")
    one_line_error(rlm("generate", "--model", "demo-latent", "--prompt", "0", "--tokenizer", str(config)),
                   "is a file, not a tokenizer folder")
    assert not (tmp_path / "p.jsonl").exists()
