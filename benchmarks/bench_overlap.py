"""Allocation overlapped with compute (same as `vattn bench overlap`): per-iteration decode
time with all pages mapped up front, synchronous mapping, and background mapping."""

import sys

from vattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "overlap", *sys.argv[1:]]))
