#!/usr/bin/env python
"""Thin entry point, same as the `scaling-tokenizer` console script (logic in scaling/data/build.py)."""
import sys

from scaling.data.build import tokenizer_main

if __name__ == "__main__":
    sys.exit(tokenizer_main())
