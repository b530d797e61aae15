#!/usr/bin/env python
"""Thin entry point, same as the `scaling-plan` console script (for launchers that want a file path)."""
import sys

from scaling.plan_cli import main

if __name__ == "__main__":
    sys.exit(main())
