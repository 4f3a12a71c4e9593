import os
import sys

from isgd.console import main
from isgd.training.distributed import env_world_size

code = main()
if env_world_size() > 1:
    # A torchrun worker: leave now. Everything it wrote is already closed and fsynced, and the
    # interpreter's own teardown can abort (SIGABRT) while gloo's threads still hold objects.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
