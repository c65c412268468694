"""Binds gammacl.kernels to the top-level kernels/ folder of a source checkout.

kernels/ has no __init__.py, so from the repo root (on sys.path under `python -c` and
`python -m pytest`) a top-level `import kernels` finds any installed regular `kernels` package
(Hugging Face's, which transformers imports) before this folder, a namespace portion at most. A
wheel installs the folder as gammacl/kernels/ (a namespace package inside gammacl); an editable
install leaves it in the checkout, where setuptools' finder does not resolve a folder without
__init__.py, so it is bound here.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import ModuleSpec
from importlib.util import module_from_spec


def bind_kernels() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.normpath(os.path.join(here, os.pardir, os.pardir, "kernels"))
    if os.path.isdir(os.path.join(here, "kernels")) or not os.path.isdir(src):
        return  # installed from a wheel (or no checkout beside): the import system finds it
    spec = ModuleSpec("gammacl.kernels", None, is_package=True)
    spec.submodule_search_locations = [src]
    sys.modules.setdefault("gammacl.kernels", module_from_spec(spec))


bind_kernels()
