"""The library core (``import isgd``) imports torch and the standard library only; the
application (data, training, comparisons, reports, the command line) sits on top of it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import isgd

LIBRARY = {
    *("isgd", "isgd.optim", "isgd.spc", "isgd.sampler", "isgd.collective", "isgd.errors"),
    *("isgd.amp", "isgd.solvers", "isgd.batchnorm", "isgd.forward_only"),
    *("isgd._numbers", "isgd._checks", "isgd._groups", "isgd.stats", "isgd.closures"),
}
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


def _run_blocked(blocked: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where the modules ``blocked`` cannot be imported."""
    prelude = f"import sys, torch\nfor m in {blocked!r}.split(): sys.modules.setdefault(m, None)\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_the_library_works_without_the_application_dependencies():
    from isgd.console import APP_MODULES

    code = (
        "import isgd\n"
        "model = torch.nn.Linear(3, 2)\n"
        "opt = isgd.ISGD(model.parameters(), lr=0.1, window=2)\n"
        "x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])\n"
        "def closure():\n"
        "    opt.zero_grad()\n"
        "    loss = torch.nn.functional.cross_entropy(model(x), y)\n"
        "    loss.backward()\n"
        "    return loss\n"
        "for _ in range(4): opt.step(closure)\n"
        "print(opt.stats.steps)\n"
    )
    out = _run_blocked(" ".join(sorted(APP_MODULES)), code)
    assert out.returncode == 0 and out.stdout.strip() == "4", out.stderr


@pytest.mark.slow
def test_the_command_line_says_what_to_install_when_the_app_extra_is_missing(tmp_path):
    for blocked, argv in (("tomli_w", "['--help']"), ("matplotlib", f"['plot', '{tmp_path}']")):
        code = f"from isgd.console import main\nsys.exit(main({argv}))\n"
        out = _run_blocked(blocked, code)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and f"({blocked} is not installed)" in lines[0], lines
        assert "pip install 'isgd[app]'" in lines[0]


# the application's layers, lowest first: a module may import its own layer and those below
RANKS = {
    "optim": 0, "spc": 0, "sampler": 0, "collective": 0, "errors": 0, "_numbers": 0,
    "amp": 0, "solvers": 0, "batchnorm": 0, "forward_only": 0, "_checks": 0, "_groups": 0,
    "stats": 0, "closures": 0,
    "integrations": 1, "data": 1, "models": 1,
    "training": 2, "reporting": 3, "experiments": 4, "cli": 5, "console": 5, "__main__": 5,
}  # fmt: skip


def test_application_layers_import_downwards_only():
    for path in sorted(SRC.rglob("*.py")):
        part = path.relative_to(SRC).parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                bits = name.split(".")
                if bits[0] != "isgd" or len(bits) < 2 or bits[1] not in RANKS:
                    continue
                assert RANKS[bits[1]] <= RANKS[part], f"{path.relative_to(SRC)} imports {name}"
