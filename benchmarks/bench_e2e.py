"""End-to-end decode throughput per KV backend (same as `vattn bench e2e`)."""

import sys

from vattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "e2e", *sys.argv[1:]]))
