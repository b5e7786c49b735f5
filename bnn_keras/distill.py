r"""Distillation from the float twin: the binary stage learns the frozen float model's softened outputs.

The loss of Hinton et al. (2015), as ReActNet (Liu et al. 2020) and Real-to-Binary
(Martinez et al. 2020) use it for BNNs: with $p^{(T)} = \mathrm{softmax}(z / T)$ of the
teacher's outputs $z_t$ and the student's $z_s$ at temperature $T$,

$$L_{KD} = T^2 \cdot \frac{1}{B}\sum_b \sum_k p^{(T)}_{t,bk}
           \left(\log p^{(T)}_{t,bk} - \log p^{(T)}_{s,bk}\right)$$

the batch mean of $\mathrm{KL}(p_t \| p_s)$, times $T^2$ so its gradient keeps the label
loss's scale when $T$ changes. With weight $\alpha$ the training loss is
$\alpha L_{KD} + (1 - \alpha) L_{label}$ ($\alpha = 1$: the distribution alone, as
ReActNet).

The outputs of bnn_keras' models (the last BatchNormalization) are scores, read as logits
here; a model ending in softmax gives probabilities, whose logarithm is a logit up to a
constant the softmax ignores (`from_logits=False`).

```python
student = models.mlp((28, 28, 1), 10, variant="binarynet")
teacher = models.mlp((28, 28, 1), 10, variant="float")   # trained before
model = DistillingModel(student, teacher, temperature=4.0, weight=0.9)
model.compile(optimizer="adam", loss="squared_hinge", metrics=["accuracy"])
model.fit(x, y_hinge)   # the history's "loss" is the label loss, "distill_loss" the KL term
```
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from bnn_keras.recipe import FIELDS, Rule

__all__ = ["DistillingModel", "distillation_loss"]

_TEMPERATURE = Rule("number", 0, low_open=True)


def _log_softmax(outputs: tf.Tensor, temperature: float, from_logits: bool) -> tf.Tensor:
    logits = outputs if from_logits else tf.math.log(tf.maximum(outputs, 1e-12))
    return tf.nn.log_softmax(logits / temperature, axis=-1)


def distillation_loss(
    teacher_outputs: tf.Tensor, student_outputs: tf.Tensor, temperature: float, from_logits: bool = True
) -> tf.Tensor:
    r"""Per-example $T^2 \cdot \mathrm{KL}(\mathrm{softmax}(z_t/T) \| \mathrm{softmax}(z_s/T))$, shape (batch,).

    Zero exactly when student and teacher give the same outputs; no gradient reaches the
    teacher. Probabilities (``from_logits=False``) are floored at 1e-12 before their log, so
    a class with probability 0 stays finite (its logit is log 1e-12).

    ```python
    distillation_loss([[2.0, 0.0]], [[0.0, 0.0]], temperature=1.0)  # [0.4338...]
    ```
    """
    _TEMPERATURE.check("temperature", temperature)
    teacher_log = tf.stop_gradient(_log_softmax(tf.convert_to_tensor(teacher_outputs, tf.float32), temperature, from_logits))
    student_log = _log_softmax(tf.convert_to_tensor(student_outputs, tf.float32), temperature, from_logits)
    return temperature**2 * tf.reduce_sum(tf.exp(teacher_log) * (teacher_log - student_log), axis=-1)


class _Untracked:
    """Holds the teacher and the KL metric outside Keras' tracking: not weights, not in a checkpoint, not saved."""

    def __init__(self, teacher: tf.keras.Model, tracker: tf.keras.metrics.Metric):
        self.teacher, self.tracker = teacher, tracker


@tf.keras.utils.register_keras_serializable(package="bnn_keras")
class DistillingModel(tf.keras.Model):
    """The student's own graph (same layers, same weights) trained against a frozen teacher.

    A functional model over the student's inputs and outputs: `save`, `copy_weights`,
    checkpoints and `evaluate` see the student alone (a saved one loads as a plain
    functional model, the student). `compute_loss` adds the
    distillation term `distillation_loss` (the teacher runs in inference mode and is never
    updated) to the compiled label loss, mixed by `weight`; the metric ``distill_loss``
    reports its batch mean, while ``loss`` stays the label loss, so curves compare with a
    run without distillation. Under `tf.distribute` the term is scaled per replica as
    Keras scales the compiled loss.
    """

    def __init__(
        self,
        student: tf.keras.Model,
        teacher: tf.keras.Model,
        temperature: float,
        weight: float = 1.0,
        from_logits: bool = True,
        **kwargs: Any,
    ):
        _TEMPERATURE.check("temperature", temperature)
        FIELDS["distill_weight"].check("weight", weight)
        for role, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, tf.keras.Model):
                raise TypeError(f"DistillingModel expects the {role} to be a Keras model, got {type(model).__name__}")
        if tuple(student.output_shape) != tuple(teacher.output_shape):
            raise ValueError(
                f"student {student.name!r} gives outputs of shape {student.output_shape} but teacher "
                f"{teacher.name!r} {teacher.output_shape}: expected the same"
            )
        kwargs.setdefault("name", student.name)
        super().__init__(inputs=student.inputs, outputs=student.outputs, **kwargs)
        self.temperature, self.weight, self.from_logits = float(temperature), float(weight), bool(from_logits)
        self._untracked = _Untracked(teacher, tf.keras.metrics.Mean(name="distill_loss"))

    @property
    def teacher(self) -> tf.keras.Model:
        return self._untracked.teacher

    @property
    def metrics(self) -> list[tf.keras.metrics.Metric]:
        return [*super().metrics, self._untracked.tracker]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):  # noqa: D102 (Keras' own)
        label = super().compute_loss(x, y, y_pred, sample_weight)
        teacher = self.teacher(x, training=False)
        term = tf.reduce_mean(distillation_loss(teacher, y_pred, self.temperature, self.from_logits))
        self._untracked.tracker.update_state(term)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        distilled = term / tf.cast(replicas, term.dtype)  # as Keras scales the compiled loss per replica
        if label is None:
            return None
        return self.weight * distilled + (1.0 - self.weight) * label

    def get_config(self) -> dict[str, Any]:
        """The student's functional config: a saved DistillingModel loads as its student."""
        return tf.keras.Model(self.inputs, self.outputs, name=self.name).get_config()

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None) -> tf.keras.Model:
        return tf.keras.Model.from_config(config, custom_objects=custom_objects)
