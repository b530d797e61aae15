#!/usr/bin/env python
"""Thin entry point, same as the `scaling-shards` console script (logic in scaling/data/build.py)."""
import sys

from scaling.data.build import shards_main

if __name__ == "__main__":
    sys.exit(shards_main())
