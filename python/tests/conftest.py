import os
import sys

# Run from the build tree (ctest sets PYTHONPATH) or after `pip install .`.
build = os.environ.get("PYTHONPATH")
if build and build not in sys.path:
    sys.path.insert(0, build)
