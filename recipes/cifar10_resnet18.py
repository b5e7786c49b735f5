"""The CIFAR-10 ResNet-18 the study binarised (Alizadeh et al., ICLR 2019, Table 5).

3x3 stem conv (64) and four stages of two basic blocks (64-128-256-512, stride 2 first in
stages 2-4), conv3x3 -> BN -> ReLU -> conv3x3 -> BN plus a real-valued shortcut (1x1
conv -> BN where the shape changes), global average pool -> dense -> BN; binary weights
(BinaryConnect) in every 3x3 conv and the classifier, clipped STE and weight clipping;
trained as cifar10_vgg10: squared hinge, Adam with the LR decaying per epoch from 3e-3
to 2e-6 over 500 epochs, batch 50, BN momentum 0.9. Images are standardised per image.

    python recipes/cifar10_resnet18.py --raw-dir /path/with/cifar-10-binary.tar.gz --out runs/resnet18
    python recipes/cifar10_resnet18.py --dataset embedded --width-multiplier 0.125 --epochs 2
"""

import sys
from pathlib import Path

try:
    import bnn_keras  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnn_keras import cli, training

RECIPE = training.RECIPES["cifar10_resnet18"]

if __name__ == "__main__":
    sys.exit(cli.main(["train", "cifar10_resnet18", *sys.argv[1:]]))
