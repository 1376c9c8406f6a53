"""What ships inside the package besides code, as litgpt ships its config hub: the training recipes (the
repository's configs/, installed as recurrent_lm.configs) and the demo checkpoints (checkpoints/, installed as
recurrent_lm.checkpoints). Both are found through the import system, so they are there in a checkout, an
editable install and a wheel alike, wherever the user stands."""

from importlib.resources import files
from pathlib import Path

from .sources import is_assembled


def recipes_dir() -> Path:
    return Path(str(files("recurrent_lm.configs")))


def checkpoints_dir() -> Path:
    return Path(str(files("recurrent_lm.checkpoints")))


def recipe_names() -> list[str]:
    return sorted(path.stem for path in recipes_dir().glob("*.yaml"))


def resolve_recipe(config: str | Path) -> Path:
    """A training config: a YAML file that exists, or the name of a shipped recipe (`debug`, `demo-latent`, ...).
    Anything else is an error that lists the shipped names."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = recipes_dir() / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"config {config} is neither a file nor a shipped recipe; shipped recipes: "
                            f"{', '.join(recipe_names())} (e.g. --config debug)")


def checkpoint_names() -> list[str]:
    """The shipped models, usable by name: whole checkpoints, and results assembled with an installed source."""
    return sorted(path.name for path in checkpoints_dir().iterdir()
                  if (path / "config.json").is_file() or is_assembled(path))


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory as given, or the name of a shipped checkpoint (`demo-latent`, `demo-cot`) when no such
    directory exists where the user stands (a shipped result still to assemble: its folder;
    recurrent_lm.loading.model_dir builds what needs building)."""
    path = Path(path)
    if path.exists() or path.parent != Path("."):
        return path
    shipped = checkpoints_dir() / path.name
    return shipped if (shipped / "config.json").is_file() or is_assembled(shipped) else path
