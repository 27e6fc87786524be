import sys

from fuse_disk_export.cli import main

sys.exit(main())
