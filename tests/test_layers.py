"""The library core (``import isgd``) imports torch and the standard library only; the
application (data, training, comparisons, reports, the command line) sits on top of it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import isgd

LIBRARY = {"isgd", "isgd.optim", "isgd.spc", "isgd.sampler", "isgd.collective", "isgd.errors"}
HEAVY = {
    "matplotlib",
    "tensorboard",
    "PIL",
    "tqdm",
    "scipy",
    "tomli_w",
    "lightning",
    "transformers",
}
SRC = Path(isgd.__file__).parent


def test_import_isgd_loads_no_application_module():
    code = (
        "import json, sys, torch; before = set(sys.modules); import isgd; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    added = json.loads(out.stdout)
    assert {m for m in added if m.split(".")[0] == "isgd"} <= LIBRARY, added
    assert not {m for m in added if m.split(".")[0] in HEAVY}, added  # beyond what torch loads


def test_library_modules_import_only_torch_the_standard_library_and_each_other():
    for name in sorted(LIBRARY):
        path = SRC / ("__init__.py" if name == "isgd" else f"{name.split('.')[1]}.py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                ok = top in sys.stdlib_module_names or top == "torch" or module in LIBRARY
                assert ok, f"{path.name} imports {module}"
