"""The ``isgd`` command's entry point: the command line needs the application's dependencies
(the ``app`` extra), which a library-only install (``pip install isgd``) does not have. Without
them it says in one line what to install, instead of a traceback: when ``isgd.cli`` cannot be
imported, and when a command imports such a dependency lazily."""

from __future__ import annotations

import sys
from collections.abc import Sequence

# import names of what the ``app`` extra installs (pyproject.toml)
APP_MODULES = frozenset(
    {"numpy", "scipy", "PIL", "tqdm", "matplotlib", "tensorboard", "tomli", "tomli_w"}
)
INSTALL_HINT = "pip install 'isgd[app]'"


def missing_app_dependency(err: ModuleNotFoundError) -> str | None:
    """The one-line message for a missing application dependency, None for any other module."""
    top = (err.name or "").split(".")[0]
    if top not in APP_MODULES:
        return None
    return (
        f"isgd: error: the command line needs the application's dependencies ({top} is not "
        f"installed): {INSTALL_HINT}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from isgd.cli import main as cli_main

        return cli_main(argv)
    except ModuleNotFoundError as err:
        message = missing_app_dependency(err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2  # a usage error (isgd.cli.common.USAGE_ERROR)
