"""The VGG convolutions' weight gradient on small bf16 maps as per-tap matrix products.

Measured (bench/NOTES.md, "Speed notes", item 11): 2-core AMD EPYC, avx512_bf16, TF 2.21, batch 8 --
block4/block5 weight gradients 199 -> 134 ms per step; step 1,446 -> 1,367 ms together with the two
changes of that session. In float32 the products do not win, so float32 keeps oneDNN's kernel.
"""

from __future__ import annotations

import keras
from keras import layers

from fcn_cli.accel import computes_on_cpu


@keras.saving.register_keras_serializable(package="fcn")
class SmallMapConv2D(layers.Conv2D):
    """A Conv2D whose weight gradient on small maps is computed as kh*kw matrix products.

    Same weights, config, outputs and input gradient as ``Conv2D``. The weight gradient of a stride-1
    'same' convolution is, for each tap (i, j), the shifted input transposed times the output
    gradient: a (C x B*H*W) by (B*H*W x O) product. In bfloat16 on small maps that runs faster
    than oneDNN's backward-weights kernel (TF 2.21, avx512_bf16, batch 8, ms: 28x28x512 48 -> 38,
    14x14x512 19 -> 11) and slower on large ones (56x56x256 50 -> 55, 224x224x64 60 -> 136), so it
    is used only in training, on the CPU, for bfloat16 maps of at most ``SMALL_MAP_PIXELS`` pixels
    with shapes known when traced (bench/NOTES.md); every other call is Conv2D's own.
    """

    SMALL_MAP_PIXELS = 32 * 32

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._training = False

    def call(self, inputs, training=None):
        # Only training takes a weight gradient: predict and evaluate run Conv2D's own path.
        self._training = bool(training)
        if not self._gemm_weight_gradient(inputs):
            return super().call(inputs)
        outputs = self._convolve_with_gemm_gradient(inputs)
        return self.activation(outputs) if self.activation is not None else outputs

    def _gemm_weight_gradient(self, inputs) -> bool:
        height, width = inputs.shape[1:3]
        kh, kw = self.kernel_size
        return (self._training and self.compute_dtype == "bfloat16" and computes_on_cpu()
                and height is not None and width is not None
                and height * width <= self.SMALL_MAP_PIXELS and self.padding == "same" and kh % 2 == 1 and kw % 2 == 1
                and tuple(self.strides) == (1, 1) and tuple(self.dilation_rate) == (1, 1) and self.groups == 1
                and self.data_format == "channels_last")

    def _convolve_with_gemm_gradient(self, inputs):
        """Convolution plus bias, whose gradient is computed here: input gradient as Conv2D's, weight
        gradient as per-tap products, bias gradient summed in float32 (oneDNN's fused backward-weights
        kernel did that; a bfloat16 sum of B*H*W terms was off by 9% in a probe)."""
        convolve = super().convolution_op
        kh, kw = self.kernel_size
        height, width, channels = inputs.shape[1:]
        # Tensors, not the variables: the custom gradient is for the values the convolution reads.
        kernel = keras.ops.cast(self.kernel, inputs.dtype)
        bias = keras.ops.cast(self.bias if self.use_bias else keras.ops.zeros((self.filters,)), inputs.dtype)

        @keras.ops.custom_gradient
        def conv(x, w, b):
            def grad(*args, upstream=None):
                dy = args[0] if upstream is None else upstream
                dx = keras.ops.conv_transpose(dy, w, strides=1, padding="same", data_format="channels_last")
                padded = keras.ops.pad(x, [[0, 0], [kh // 2, kh // 2], [kw // 2, kw // 2], [0, 0]])
                dy_rows = keras.ops.reshape(dy, (-1, self.filters))
                taps = [keras.ops.matmul(keras.ops.transpose(keras.ops.reshape(padded[:, i:i + height, j:j + width, :], (-1, channels))), dy_rows)
                        for i in range(kh) for j in range(kw)]
                dw = keras.ops.reshape(keras.ops.stack(taps), (kh, kw, channels, self.filters))
                db = keras.ops.cast(keras.ops.sum(keras.ops.cast(dy_rows, "float32"), axis=0), b.dtype)
                return dx, dw, db

            return keras.ops.add(convolve(x, w), keras.ops.reshape(b, (1, 1, 1, -1))), grad

        return conv(inputs, kernel, bias)


