"""``python -m bnn_keras.export MODEL_PATH --out FILE ...``"""

import sys

from bnn_keras.export.cli import main

sys.exit(main())
