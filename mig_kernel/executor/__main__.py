"""``python -m mig_kernel.executor``: started by the broker, spec on stdin."""

import sys

from .server import main

sys.exit(main())
