#!/usr/bin/env python3
"""qemu-fuse-disk-export.py: fuse-disk-export under the name the QEMU blog post uses.

    qemu-fuse-disk-export.py foo.qcow2 &        # "All exports set up, ^C to revert"; kill -SIGINT %1
    qemu-fuse-disk-export.py -dp qfde.pid foo.qcow2

Same options as fuse-disk-export (see --help).  Run from a checkout, it uses the checkout's code
with the checkout's .venv (./scripts/setup makes it); copied elsewhere, the installed package.
It replaces itself with that Python (same pid), so signals reach the exporting process.
"""

import os
import sys

here = os.path.dirname(os.path.realpath(__file__))
checkout = os.path.dirname(here)
venv_python = os.path.join(checkout, ".venv", "bin", "python")

in_checkout = os.path.isfile(os.path.join(checkout, "fuse_disk_export", "cli.py"))
if in_checkout:
    if os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(checkout, ".venv")):
        if not os.access(venv_python, os.X_OK):
            sys.exit(f"qemu-fuse-disk-export.py: no {venv_python}; run {checkout}/scripts/setup")
        os.execv(venv_python, [venv_python, os.path.realpath(__file__), *sys.argv[1:]])
    sys.path.insert(0, checkout)

try:
    from fuse_disk_export.entry import main
except ImportError as e:
    sys.exit(f"qemu-fuse-disk-export.py: fuse-disk-export is not installed ({e})")

sys.exit(main())
