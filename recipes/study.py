"""The study's ablation tables (optimisers, clipping, BN momentum, schedules) over seeds.

Same as ``bnn-keras study``: trains every cell into OUT/<table>/<cell>/seed<k>/, writes
OUT/tables.md and OUT/<table>.png, and skips finished runs when run again.

    python recipes/study.py --quick --out runs/study-quick          # minutes on a laptop CPU
    python recipes/study.py --tables clipping bn_momentum --seeds 5 --out runs/study
"""

import sys
from pathlib import Path

try:
    import bnn_keras  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnn_keras import cli, study

TABLES = study.TABLES

if __name__ == "__main__":
    sys.exit(cli.main(["study", *sys.argv[1:]]))
