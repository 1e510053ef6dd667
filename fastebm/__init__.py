"""fastebm: EBM-RL (GRPO with decomposed rewards) for video vision-language models.

The Triton kernels live in the repository's top-level ``kernels/`` folder and are imported as
``fastebm.kernels``. An installed copy (``pip install .`` or ``-e .``) maps them there through
setup.py; from a plain checkout the small finder below does the same, so both import the kernels
the same way and nothing ever installs a top-level package called ``kernels``.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

_KERNELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Resolve ``fastebm.kernels`` to ``<checkout>/kernels`` when no installed mapping exists."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "fastebm.kernels":
            return None
        init = os.path.join(_KERNELS_DIR, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[_KERNELS_DIR]
        )


# Appended last: an installed (or editable) mapping, found by the regular finders, wins.
if not any(isinstance(f, _CheckoutKernelsFinder) for f in sys.meta_path):
    sys.meta_path.append(_CheckoutKernelsFinder())
