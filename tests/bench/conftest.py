"""``benchmarks/`` is not an installed package: make ``benchmarks.compare`` importable when
pytest is started as ``pytest`` (``python -m pytest`` puts the repository root on the path)."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
