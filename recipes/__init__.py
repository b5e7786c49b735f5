"""The study's experiments as runnable scripts, one per recipe.

The settings live in the package (`bnn_keras.training.RECIPES`), so `bnn-keras train NAME`
works from an installed wheel without this folder; each script here shows one recipe and
runs it: ``python recipes/mnist_mlp.py [flags]`` is ``bnn-keras train mnist_mlp [flags]``,
``python recipes/study.py [flags]`` is ``bnn-keras study [flags]``.
"""

from bnn_keras.training import RECIPES, Recipe

SCRIPTS = {
    "mnist_mlp": "mnist_mlp.py",
    "cifar10_vgg10": "cifar10_vgg10.py",
    "cifar10_resnet18": "cifar10_resnet18.py",
    "study": "study.py",
}
"""Script file (in this folder) per recipe name, plus the study runner."""

__all__ = ["RECIPES", "Recipe", "SCRIPTS"]
