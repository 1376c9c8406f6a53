"""The documented range of every numeric option, checked in one place.

A command declares its ranges once, `@ranges(n=">= 1", top_p="(0, 1]")`: the range is written into the option's
--help text (from the docstring's Args entry), and every call, from the command line or from Python, is checked
before the function body runs, so a value outside its range (NaN and infinities included) is a one-line error
naming the option before any work. None is always allowed (it means "the default"); it is never confused with 0.
"""

import functools
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

# Ranges that many options share: a depth (core steps per token) and a count of problems per difficulty; beyond
# these a value is a typo, not a plan (raise the constants if you mean it)
MAX_NUM_STEPS = 100_000  # more core steps per token than this is a typo (recurrent_lm.depth checks it)
MAX_PROBLEMS = 1_000_000
DEPTH = f"[1, {MAX_NUM_STEPS}]"
PROBLEMS = f"[1, {MAX_PROBLEMS}]"


@dataclass(frozen=True)
class Range:
    """An interval of numbers; either end may be open or missing."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        low, high = written(self.low), written(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def written(bound: float | None) -> str:
    """1000000, not 1e+06; 0.5 as 0.5."""
    return "" if bound is None else str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def parse_range(text: str) -> Range:
    """">= 1", "> 0", "<= 5", "< 1", "[0, 1]", "(0, 1]" ..."""
    text = text.strip()
    bound = re.fullmatch(r"(>=|>|<=|<)\s*(\S+)", text)
    if bound:
        op, value = bound.group(1), float(bound.group(2))
        return Range(low=value, low_open=op == ">") if op.startswith(">") else Range(high=value, high_open=op == "<")
    interval = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", text)
    if not interval:
        raise ValueError(f"not a range: {text!r}")
    return Range(float(interval.group(2)), float(interval.group(3)), interval.group(1) == "(", interval.group(4) == ")")


def check_number(name: str, value, allowed: Range) -> None:
    """A number (or each of a list of numbers) within `allowed`; None passes. The error names the option."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item is None:
            continue
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ValueError(f"--{name} must be a number {allowed}, got {item!r}")
        if not math.isfinite(item):
            raise ValueError(f"--{name} must be a finite number {allowed}, got {item}")
        if not allowed.holds(item):
            raise ValueError(f"--{name} must be {allowed}, got {item}")


def ranges(prefix: str = "", **declared: str) -> Callable:
    """Decorate a command (or a class whose __init__ takes options, as LightningCLI's modules do): check each named
    option against its range at every call, and say the range in its --help text. `prefix` is how the command line
    spells the options' section (e.g. "model." for `--model.learning_rate`)."""

    def decorate(target: Callable) -> Callable:
        function = target.__init__ if isinstance(target, type) else target
        signature = inspect.signature(function)
        parsed = {name: parse_range(text) for name, text in declared.items()}
        unknown = sorted(set(parsed) - set(signature.parameters))
        if unknown:
            raise TypeError(f"{target.__name__} has no options {unknown}")
        target.__doc__ = documented(target.__doc__ or "", parsed)

        @functools.wraps(function)
        def checked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            for name, allowed in parsed.items():
                check_number(prefix + name, bound.arguments[name], allowed)
            return function(*args, **kwargs)

        checked.option_ranges = parsed
        if isinstance(target, type):
            target.__init__ = checked
            return target
        return checked

    return decorate


def documented(doc: str, parsed: dict[str, Range]) -> str:
    """The docstring with "(range: ...)" after each ranged option's Args entry."""
    lines = doc.splitlines()
    for name, allowed in parsed.items():
        start = next((i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:")), None)
        if start is None:
            continue
        indent = indent_of(lines[start])
        end = start
        while end + 1 < len(lines) and lines[end + 1].strip() and indent_of(lines[end + 1]) > indent:
            end += 1
        lines[end] += f" (range: {str(allowed).removeprefix('in ')})"
    return "\n".join(lines)


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def parse_error_line(error: Exception) -> str:
    """A command-line parser's error (jsonargparse's are several lines, and name "Parser key" for an option) as one
    line naming the option as it is typed."""
    message = re.sub(r'Parser key "([^"]+)"', r"--\1", " ".join(str(error).split()))
    # jsonargparse refuses nan and inf as floats: say what is wrong with them
    message = re.sub(r"Expected a <class 'float'>(\. Got value:|, got) (-?(?:nan|inf))\b", r"must be a finite number, got \2",
                     message)
    # an Optional option's error lists why each member of the union failed: the None member's reason says nothing
    head, union, reasons = message.partition(" Does not validate against any of the Union subtypes")
    if union:
        reasons, _, given = reasons.partition(" Given value type:")
        kept = [r.strip() for r in reasons.split(" - ")[1:] if "NoneType" not in r]
        value = given.partition(" Given value: ")[2]
        message = f"{head} {'; '.join(kept)}" + (f", got {value}" if value and "NestedArg" not in value else "")
    if "Expected a <class 'list'>" in message:  # --steps takes 1,2 but a list of floats is written in brackets
        message += "; write a list in brackets, e.g. [0.5, 1.5]"
    return message
