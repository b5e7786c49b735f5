"""The study's CIFAR-10 VGG-10 (Alizadeh et al., ICLR 2019, section 3).

128C3-128C3-MP2-256C3-256C3-MP2-512C3-512C3-MP2-FC1024-FC1024-FC10, 3x3 stride 1 SAME,
no bias, max-pool right after its convolution, BN (momentum 0.9, epsilon 1e-4) after
every layer; binary weights (BinaryConnect), clipped STE and weight clipping; squared
hinge; Adam with the LR decaying per epoch from 3e-3 to 2e-6 over 500 epochs; batch 50.
Images are standardised per image (the study used BinaryConnect's GCN + ZCA set).

    python recipes/cifar10_vgg10.py --raw-dir /path/with/cifar-10-binary.tar.gz --out runs/vgg10
    python recipes/cifar10_vgg10.py --dataset embedded --width-multiplier 0.125 --epochs 2
"""

import sys
from pathlib import Path

try:
    import bnn_keras  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnn_keras import cli, training

RECIPE = training.RECIPES["cifar10_vgg10"]

if __name__ == "__main__":
    sys.exit(cli.main(["train", "cifar10_vgg10", *sys.argv[1:]]))
