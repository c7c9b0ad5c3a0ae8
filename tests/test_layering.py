"""The package graph points one way: export is the bottom layer, runtime sits on export only, mrp_pass on both."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("package", "forbidden"), [("export", ("mrp_pass", "runtime")), ("runtime", ("mrp_pass",))])
def test_layers_import_downwards_only(package, forbidden):
    """A fresh interpreter imports the package and every module of it; none may load a layer above it."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({forbidden!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {package} loaded {out.stdout.strip()}"
