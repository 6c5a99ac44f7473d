"""tests.scripted_runner after a slow start (``SLOW_START_S``), so a test can catch a sandbox while it starts."""
from __future__ import annotations

import sys
import time

from tests.scripted_runner import main

SLOW_START_S = 4.0

if __name__ == "__main__":
    time.sleep(SLOW_START_S)
    sys.exit(main())
