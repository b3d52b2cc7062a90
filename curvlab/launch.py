"""Whether this process is one of several started by ``torchrun``: its environment, read without torch.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``WORLD_SIZE`` > 1 means the command shares its work with other processes, and
:mod:`curvlab.distributed` (which needs torch) joins their process group. The command line asks this
question before anything imports torch: it refuses single-process commands under ``torchrun`` and names
the process in its error lines.
"""

from __future__ import annotations

import os


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or by hand) as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False
