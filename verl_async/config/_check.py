"""Validation helpers shared by the config dataclasses: one error type, prescriptive messages."""

from collections.abc import Iterable


class ConfigError(ValueError):
    """A config value is invalid. The message names the key and says how to fix it."""


def check(ok: bool, key: str, value: object, fix: str) -> None:
    """Raise ConfigError for `key` unless `ok`; `fix` tells the user what to do."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    check(value in choices, key, value, f"choose one of {', '.join(choices)}.")


def absolute_spec(spec: str) -> str:
    """`path/to/file.py:name` with the path made absolute (Ray actors may run in another folder);
    any other spec (a registry name, `package.module:name`) is returned as is."""
    import os

    module_part, sep, attr = spec.rpartition(":")
    if sep and module_part.endswith(".py"):
        return f"{os.path.abspath(os.path.expanduser(module_part))}:{attr}"
    return spec
