import sys

from fuse_disk_export.entry import main

sys.exit(main())
