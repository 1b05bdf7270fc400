"""User code named in the config: `package.module:name` or `path/to/file.py:name`.

File paths are made absolute when the config is loaded (config/_check.absolute_spec), so Ray
actors that run elsewhere import the same file.
"""

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any


def load_object(spec: str, key: str) -> Any:
    """The object `spec` names; ValueError that names the config `key` and the fix otherwise."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ValueError(f"{key}={spec!r}: name it as `package.module:name` or `path/to/file.py:name`.")
    try:
        module = _import_file(module_part, key) if module_part.endswith(".py") else importlib.import_module(module_part)
    except ImportError as e:
        raise ValueError(f"{key}={spec!r} cannot be imported ({e}); check the module path "
                         "(or name a file: `path/to/file.py:name`).") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{key}={spec!r}: {module_part} has no attribute {attr!r}.") from None


def _import_file(path_str: str, key: str):
    path = Path(path_str).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"{key}: the file {path} does not exist; fix the path.")
    name = f"verl_async_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
