"""moec: a compiler for Mixture-of-Experts models.

```python
import moec
art = moec.compile(model, example_inputs, target="ort", output="out/")  # or a SRC string
m = moec.load("out/")       # a Runner: m(input_ids) -> logits
report = moec.verify("out/")  # per-output error and routing agreement; truthy when in tolerance
```

Attributes are imported on first use, so ``import moec.runtime`` on a deployment machine does
not load the compiler.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "CompileResult",
    "CompileSettings",
    "MoecError",
    "Runner",
    "VerifyReport",
    "__version__",
    "compile",
    "load",
    "verify",
]

_LAZY = {
    "compile": ("moec.pipeline", "compile_model"),
    "CompileResult": ("moec.pipeline", "CompileResult"),
    "CompileSettings": ("moec.settings", "CompileSettings"),
    "load": ("moec.runtime.load", "load"),
    "Runner": ("moec.runtime.runner", "Runner"),
    "verify": ("moec.verification", "verify"),
    "VerifyReport": ("moec.runtime.compare", "VerifyReport"),
    "MoecError": ("moec.errors", "MoecError"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'moec' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
