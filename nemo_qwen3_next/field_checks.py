"""`ConfigError` and `check_field`: the one-line field checks shared by the model config and the
pretraining config. Stdlib only, so the CLIs check values before megatron-core (~3 s) is imported."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A Qwen3-Next config field has a bad value; the message names the field and the fix."""


# "pos" int >= 1, "nonneg" int >= 0, "pos?"/"nonneg?" also None, "posf" number > 0,
# "nonnegf" number >= 0, "prob" number in [0, 1), "bool".
_KIND_TEXT = {"pos": "an integer >= 1", "nonneg": "an integer >= 0", "posf": "a number > 0",
              "nonnegf": "a number >= 0", "prob": "a number in [0, 1)", "bool": "true or false"}


def check_field(name: str, value: Any, kind: str, where: str = "") -> None:
    """One line naming the field if `value` is not of `kind` (see `_KIND_TEXT`); bools are not numbers."""
    base = kind.rstrip("?")
    if value is None and kind.endswith("?"):
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = is_int or isinstance(value, float)
    ok = {"pos": is_int and value >= 1, "nonneg": is_int and value >= 0,
          "posf": is_num and value > 0 and value == value and value != float("inf"),
          "nonnegf": is_num and value >= 0 and value != float("inf"),
          "prob": is_num and 0 <= value < 1, "bool": isinstance(value, bool)}[base]
    if not ok:
        what = _KIND_TEXT[base] + (" or null" if kind.endswith("?") else "")
        raise ConfigError(f"{where}{name} = {value!r} ({type(value).__name__}) must be {what}; fix {name}.")
