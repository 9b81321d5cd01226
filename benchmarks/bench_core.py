"""Core cache numbers (same as `vattn bench core`): bulk map through step, no-op step,
fragmentation per layout, decode attention on the mapped cache."""

import sys

from vattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "core", *sys.argv[1:]]))
