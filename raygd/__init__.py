"""raygd: gradient diversity and data-parallel SGD experiments on Ray, recorded in MLflow.

``raygd.attach(model)`` puts the batch-size bound into a Ray Train loop of your own (``raygd.probe``);
it is imported on first use, so ``import raygd`` loads neither torch nor Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raygd.probe import attach

__version__ = "0.1.0"
__all__ = ["__version__", "attach"]


def __getattr__(name: str) -> Any:
    if name == "attach":
        from raygd.probe import attach

        return attach
    raise AttributeError(f"module 'raygd' has no attribute {name!r}")
