"""Decode attention on the virtual cache (same as `vattn bench decode`): our Triton
kernel, torch's kernels, FlashAttention when installed, and the paged twin."""

import sys

from vattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
