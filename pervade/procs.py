"""Whether a process of this host is alive: leftovers named with their writer's pid are removed once that
writer is gone (downloads in a node cache, a sink's unfinished files)."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
