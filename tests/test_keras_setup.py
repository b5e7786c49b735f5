"""tf.keras must be tf-keras for Larq: every import order works or fails in one line."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)


def test_bnn_keras_first_binds_tf_keras():
    result = run("import bnn_keras, tensorflow as tf, larq; print(tf.keras.layers.Dense.__module__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split(".")[0] == "tf_keras"


def test_installing_bnn_keras_leaves_other_programs_on_keras_3():
    """No start-up hook: a program that never imports bnn_keras keeps TensorFlow's own tf.keras."""
    result = run("import tensorflow as tf; print(tf.keras.layers.Dense.__module__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split(".")[0] == "keras"  # Keras 3, not tf_keras


def test_tensorflow_first_without_the_variable_is_a_one_line_error():
    """TensorFlow imported first binds part of Keras 3: refuse in one line instead of Larq's AttributeError."""
    result = run("import tensorflow as tf; import bnn_keras")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bnn_keras._keras_setup.Keras3LoadedError: ")
    assert "tensorflow was imported before bnn_keras" in last and "TF_USE_LEGACY_KERAS=1" in last


def test_tensorflow_first_with_the_variable_set_works():
    result = run("import tensorflow as tf; import bnn_keras, larq as lq; "
                 "print(tf.keras.layers.Dense.__module__, lq.layers.QuantDense.__name__)", TF_USE_LEGACY_KERAS="1")
    assert result.returncode == 0, result.stderr
    module, name = result.stdout.split()
    assert module.split(".")[0] == "tf_keras" and name == "QuantDense"


def test_keras3_already_bound_is_a_one_line_error():
    code = ("import os; os.environ['TF_USE_LEGACY_KERAS'] = '0'; import tensorflow as tf; tf.keras.layers; "
            "os.environ.pop('TF_USE_LEGACY_KERAS'); import bnn_keras")
    result = run(code)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bnn_keras._keras_setup.Keras3LoadedError: ")
    assert "Keras 3 was already loaded as tf.keras" in last and "TF_USE_LEGACY_KERAS=1" in last


def test_legacy_keras_explicitly_disabled_is_a_one_line_error():
    result = run("import bnn_keras", TF_USE_LEGACY_KERAS="0")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "TF_USE_LEGACY_KERAS='0'" in last and "set TF_USE_LEGACY_KERAS=1" in last
