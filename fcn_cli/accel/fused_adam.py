"""Adam with one fused update kernel per variable on TensorFlow (Keras's Adam, identical up to rounding).

Keras 3's Adam updates each variable with about ten element-wise ops (sub, mul, assign_add for m;
square, sub, mul, assign_add for v; sqrt, add, div, mul, assign_sub for the weights), each one a
pass over the variable. For FCN-8s that is 134 M float32 parameters, and on a CPU without XLA the
passes are separate kernels: the update streams the weights, both moments and the gradient through
memory about a dozen times per step. TensorFlow's ``ResourceApplyAdam`` does the same update in one
multi-threaded pass. Measured (bench/NOTES.md, "Earlier (morning session)", item 2; 2-core AMD EPYC,
bf16, batch 8, full step, median of the last 4 of 6): Keras Adam 1.649 s, FusedAdam 1.518 s, plain SGD
(no state at all) 1.468 s. Other backends, AMSGrad and sparse gradients take Keras's own path.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="fcn")
class FusedAdam(keras.optimizers.Adam):
    """``keras.optimizers.Adam`` whose dense update is TensorFlow's fused ``ResourceApplyAdam``.

    The update is Keras's: m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2);
    w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps); the kernel forms 1 - b in float32
    where Keras casts a float64 difference, so the two agree to the last bits only.
    """

    def update_step(self, gradient, variable, learning_rate):
        if keras.backend.backend() != "tensorflow" or self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        if isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        var = variable.value if isinstance(variable, keras.Variable) else variable
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        dtype = var.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=var.handle,
            m=m.value.handle,
            v=v.value.handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
            use_locking=False,
        )
