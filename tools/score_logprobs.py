#!/usr/bin/env python3
"""Score token log-probs with a Megatron checkpoint; see holderpo_megatron/trainer/scoring.py."""

import sys

from holderpo_megatron.trainer.scoring import main

if __name__ == "__main__":
    sys.exit(main())
