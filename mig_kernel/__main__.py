"""``python -m mig_kernel`` is the ``mig-kernel`` command."""

from .cli import main

main()
