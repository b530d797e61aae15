#!/usr/bin/env python
"""Thin entry point, same as the `scaling-convert` console script (for launchers that want a file path)."""
import sys

from scaling.convert import main

if __name__ == "__main__":
    sys.exit(main())
