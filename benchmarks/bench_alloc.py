"""Allocation bandwidth per page size (same as `vattn bench alloc`): raw driver loop,
vattn's step, the background mapper, and the demand model."""

import sys

from vattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "alloc", *sys.argv[1:]]))
