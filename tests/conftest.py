import os
import sys

# Let tests import the shared references (tests/references.py) and run without an install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
