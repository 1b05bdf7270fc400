"""Environments for multi-turn, tool-using rollouts: the protocol, the built-ins and the registry."""

from verl_async.envs.base import Environment, EnvStep, ModelTurn
from verl_async.envs.registry import ENVIRONMENTS, EnvFactory, check_env_at_startup, resolve_env

__all__ = ["ENVIRONMENTS", "EnvFactory", "EnvStep", "Environment", "ModelTurn", "check_env_at_startup",
           "resolve_env"]
