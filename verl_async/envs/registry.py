"""The environment registry: built-in environments by name, custom ones by import path.

`resolve_env` is called at start-up (before any engine starts) and again in the rollouter: a
wrong name, a class without async `start`/`step`, or `data.env.args` that its constructor does
not take fail at once with how to fix them. At start-up one instance is also made, so a bad
argument value fails there too: constructors must be cheap (one instance per episode); put
heavy set-up in `start`.
"""

import functools
import inspect
from collections.abc import Callable

from verl_async.config import EnvConfig
from verl_async.envs.base import Environment
from verl_async.envs.calculator import CalculatorEnv
from verl_async.envs.scripted import ScriptedEnv
from verl_async.plugins import load_object

ENVIRONMENTS: dict[str, type] = {
    "calculator": CalculatorEnv,  # a generated tool task the tiny model learns on CPU
    "scripted": ScriptedEnv,  # replays a fixed script: tests and debugging
}

EnvFactory = Callable[[], Environment]


def resolve_env(env: EnvConfig) -> EnvFactory:
    """A factory that makes one environment per episode, checked now."""
    if env.name in ENVIRONMENTS:
        cls = ENVIRONMENTS[env.name]
    elif ":" in env.name:
        cls = load_object(env.name, "data.env.name")
    else:
        raise ValueError(f"data.env.name={env.name!r} is unknown: use one of {', '.join(ENVIRONMENTS)}, "
                         "`package.module:Class` or `path/to/file.py:Class`.")
    if not inspect.isclass(cls):
        raise ValueError(f"data.env.name={env.name!r} is not a class: name a class with async start/step.")
    missing = [m for m in ("start", "step") if not inspect.iscoroutinefunction(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"data.env.name={env.name!r}: {cls.__name__} needs `async def` methods "
                         f"{', '.join(missing)} (see verl_async/envs/base.py).")
    try:
        inspect.signature(cls).bind(**env.args)
    except TypeError as e:
        raise ValueError(f"data.env.args={env.args!r} do not fit {cls.__name__}{inspect.signature(cls)}: {e}.") from None
    return functools.partial(cls, **env.args)


def check_env_at_startup(env: EnvConfig, model_path: str) -> None:
    """Fail before any engine starts: the environment resolves, and the model is a text model."""
    if not env.enabled:
        return
    from verl_async.data.vision import is_vl_model

    make_env = resolve_env(env)
    try:
        make_env()
    except Exception as e:  # user code: report what it raised, with the key to fix
        raise ValueError(f"data.env.name={env.name!r} with data.env.args={env.args!r}: the constructor raised "
                         f"{type(e).__name__}: {e}") from e
    if is_vl_model(model_path):
        raise ValueError(f"data.env.name={env.name!r}: multi-turn environments run on text models only "
                         "for now; use a text model or unset data.env.name.")
