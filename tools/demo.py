#!/usr/bin/env python
"""Thin entry point, same as the `scaling-demo` console script."""
import sys

from scaling.demo import main

if __name__ == "__main__":
    sys.exit(main())
