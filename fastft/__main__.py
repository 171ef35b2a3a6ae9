"""``python -m fastft`` (and ``torchrun --nproc-per-node N -m fastft train CONFIG.yaml``).

``python -m`` puts the caller's folder first on sys.path, where a user's own ``kernels.py`` or
``data.py`` would shadow what fastft and transformers import (issue 16); the ``fastft`` command
never has it there, so neither does this entry point. ``fastft`` itself is already imported.
"""
import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from fastft.cli import main  # noqa: E402

main()
