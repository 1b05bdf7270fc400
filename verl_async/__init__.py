"""verl_async: fully asynchronous RL post-training for LLMs and VLMs (Ray + vLLM + torch).

Importing the package is cheap on purpose: torch, vLLM and Ray load only in the
modules that need them.
"""

__version__ = "0.1.0"
