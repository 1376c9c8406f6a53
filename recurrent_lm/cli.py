"""`rlm`: the one command line of the project. Every subcommand is a typed function parsed by jsonargparse, so
each takes `--config FILE.yaml` and its `--help` lists every option with its type, default and documentation."""

import sys
from pathlib import Path

from jsonargparse import auto_cli


def convert_huginn(src: Path, dst: Path, dtype: str | None = None, overwrite: bool = False) -> None:
    """Convert a Huginn-0125 checkpoint directory (reference config.json + safetensors) into a RecurrentLM directory.

    Args:
        src: the Huginn checkpoint directory (e.g. a local copy of tomg-group-umd/huginn-0125).
        dst: where to write the converted model; `RecurrentLM.from_pretrained(dst)` loads it.
        dtype: cast the weights, e.g. float32 or bfloat16; by default they keep the checkpoint's dtype.
        overwrite: replace dst if it already exists.
    """
    from .huginn import convert_huginn_checkpoint

    out = convert_huginn_checkpoint(src, dst, dtype=dtype, overwrite=overwrite)
    print(f"wrote {out}")


COMMANDS = {"convert-huginn": convert_huginn}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        auto_cli(COMMANDS, args=argv, as_positional=True)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # bad input: one clear line, no traceback
        sys.exit(f"rlm: error: {error}")


if __name__ == "__main__":
    main()
