"""Fused prefill + decode attention (same as `vattn bench pod`): `pod_attention` against
the best prefill and decode kernels back to back and on two streams."""

import sys

from vattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "pod", *sys.argv[1:]]))
