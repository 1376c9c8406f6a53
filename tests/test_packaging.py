"""What the package carries and how its dependency ranges are proven: one import namespace, shipped recipes and
checkpoints usable by name from any directory, lower bounds pinned by the minimum-versions run."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from recurrent_lm.loading import load_model, load_tokenizer
from recurrent_lm.recipes import checkpoint_names, recipe_names, recipes_dir, resolve_model_dir, resolve_recipe

from .test_cli import rlm

ROOT = Path(__file__).parent.parent
tomllib = pytest.importorskip("tomllib")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def direct_requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def test_minimum_versions_pin_every_lower_bound_of_pyproject():
    """.ci/minimum-versions installs exactly the lower bounds: the two files must not drift apart."""
    pins = {}
    for line in (ROOT / ".ci" / "minimum-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = Version(version.strip())
    lower = {}
    for requirement in direct_requirements():
        bounds = [s.version for s in requirement.specifier if s.operator == ">="]
        assert bounds, f"{requirement} has no lower bound"
        lower[requirement.name.lower()] = Version(bounds[0])
    assert pins == lower


def test_everything_installs_under_one_namespace():
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert all(name == "recurrent_lm" or name.startswith("recurrent_lm.") for name in setuptools["packages"])
    assert set(setuptools["package-dir"].values()) >= {"train", "eval", "configs", "checkpoints"}


def test_shipped_recipes_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"debug", "demo-latent", "demo-cot", "s1"} <= set(recipe_names())
    assert resolve_recipe("debug") == recipes_dir() / "debug.yaml"
    assert resolve_recipe("debug.yaml") == recipes_dir() / "debug.yaml"
    own = tmp_path / "debug.yaml"
    own.write_text("seed_everything: 1\n")
    assert resolve_recipe("debug.yaml") == Path("debug.yaml")  # a file where the user stands wins over a name
    with pytest.raises(FileNotFoundError, match="shipped recipes: .*debug"):
        resolve_recipe("configs/nope.yaml")


def test_shipped_checkpoints_load_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checkpoint_names() == ["addition", "addition-columns", "copy", "demo-cot", "demo-cot-stated", "demo-exit-gate",
                                 "demo-latent", "demo-prm", "parity", "pointer-cot", "pointer-latent", "prefix-sums",
                                 "smollm2-recurrent"]  # the last assembled from its installed source
    assert (resolve_model_dir("demo-latent") / "model.safetensors").is_file()
    assert load_model("demo-latent").config.model_type == "recurrent_lm"
    assert len(load_tokenizer("demo-cot")) > 0
    with pytest.raises(FileNotFoundError, match="shipped checkpoints, usable by name: addition, addition-columns, copy, demo-cot, demo-cot-stated, demo-exit-gate, demo-latent, demo-prm, parity, pointer"):
        load_model("no-such-model")


def test_train_names_a_shipped_recipe_and_rejects_an_unknown_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = rlm("train", "--config", "debug", "--print_config")
    assert result.returncode == 0, result.stderr
    assert "max_steps: 60" in result.stdout
    result = rlm("train", "--config", "nope")
    assert result.returncode != 0
    assert "config nope is neither a file nor a shipped recipe" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_every_test_the_readme_names_exists():
    """The troubleshooting table (docs/troubleshooting.md) names the test that keeps each row true: those tests must
    exist, and every row names one."""
    import re

    table = (ROOT / "docs" / "troubleshooting.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    assert len(rows) >= 40 and all(re.search(r"`test_\w+\.py|same \|", row) for row in rows)
    named = re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?`", table)
    for file, test in named:
        assert (ROOT / "tests" / file).is_file(), file
        assert not test or f"def {test}(" in (ROOT / "tests" / file).read_text(), f"{file}::{test}"
