"""The study's MNIST MLP (Alizadeh et al., ICLR 2019, section 3).

3 hidden layers x 2048 units, each dense (no bias) -> BN -> ReLU, output dense -> BN;
binary weights (BinaryConnect), clipped STE and weight clipping from the first step;
squared hinge loss; Adam (beta1 0.9, beta2 0.999) with the LR decaying exponentially per
epoch from 1e-3 to 3e-6 over 250 epochs; batch 100; BN momentum 0.85, epsilon 1e-4;
the last 10% of the training set for validation; test accuracy reported at the epoch of
best validation accuracy. Data: the embedded Fashion-MNIST subset unless ``--dataset``
says otherwise (``--dataset mnist --raw-dir DIR`` for the study's MNIST).

    python recipes/mnist_mlp.py --out runs/mnist_mlp               # the full recipe
    python recipes/mnist_mlp.py --epochs 10 --hidden-units 512 512 512 --out runs/quickstart
"""

import sys
from pathlib import Path

try:
    import bnn_keras  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnn_keras import cli, training

RECIPE = training.RECIPES["mnist_mlp"]

if __name__ == "__main__":
    sys.exit(cli.main(["train", "mnist_mlp", *sys.argv[1:]]))
