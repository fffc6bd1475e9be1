"""Under ``pytest -m "not ray"`` (``make test-fast``) Ray may not start: ``tests/conftest.py`` imports this
module and puts its folder on ``PYTHONPATH``, so every Python process the tests start (``raygd train``,
``ray start``, ...) imports it too, as ``sitecustomize``. When ``ray`` is imported, ``ray.init`` and the
start of a Ray node raise, so a test that starts Ray without being marked ``ray`` fails loudly instead of
slipping into the fast tier."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

MESSAGE = (
    "Ray started under pytest -m 'not ray' (make test-fast): mark the test `ray` "
    "(tests/conftest.py: RAY_FIXTURES or STARTS_RAY_IN_A_SUBPROCESS)"
)


def _refuse(*args, **kwargs):
    raise RuntimeError(MESSAGE)


def _forbid(ray) -> None:
    from ray._private import node

    ray.init = _refuse
    node.Node.__init__ = _refuse


class _RayGuard(importlib.abc.MetaPathFinder):
    """Finds ``ray`` as usual and patches it once it has been executed."""

    def find_spec(self, name, path, target=None):
        if name != "ray":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _forbid(module)

            spec.loader.exec_module = exec_module
        return spec


if "ray" in sys.modules:
    _forbid(sys.modules["ray"])
elif not any(isinstance(finder, _RayGuard) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RayGuard())
