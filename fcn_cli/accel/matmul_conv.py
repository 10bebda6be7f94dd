"""fc6/fc7 as what they are: a fully connected layer applied at every window, one matrix product.

Measured (bench/NOTES.md, "Speed notes"; 2-core AMD EPYC, avx512_bf16, TF 2.21, bf16, batch 8, 224x224):
conv6 forward + backward 246 ms against oneDNN's direct convolution's 759 (which spent most of it
reordering the 100M-weight kernel and in a slow backward-weights kernel), the whole step 2.25 -> 1.48 s;
the windows by one gather took the unfold's gradient from 47 to 7 ms; the (out, in) serving layout
117.9 -> 91.7 ms per conv6 forward. On the Intel Xeon with AMX the whole product path (every lever, bf16
with AMX) trained 4.70x and served 6.29x plain float32 Keras in one ``make bench`` run.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers


@keras.saving.register_keras_serializable(package="fcn")
class MatmulConv2D(layers.Conv2D):
    """A Conv2D whose stride-1 convolution runs as one matrix product over unfolded windows (im2col).

    Same weights (kh, kw, in, out), same config, same outputs as ``Conv2D``; only the arithmetic path
    differs. For the head's big kernels on small maps (conv6: 7x7x512 -> 4096 on a 7x7 map at 224x224)
    oneDNN's direct convolution spends most of a training step reordering the 100M-weight kernel
    and in a slow backward-weights kernel; one GEMM of (windows x kh*kw*in) by (kh*kw*in x out) runs
    3x faster forward + backward in bf16 here (bench/NOTES.md). Kept to the head: for 3x3 layers
    on large maps the unfolded windows cost more than they save (measured too).

    ``kernel_layout="oi"`` (for serving, see :func:`serving_config`) holds the kernel in memory as
    (out, kh*kw*in): oneDNN's product reads it 25% faster that way (conv6 forward, bf16, batch 8:
    92 vs 117 ms; forward + backward measured equal, so training keeps Conv2D's layout, whose
    initializer fans are right). Saved files always hold Conv2D's layout.
    """

    LAYOUTS = ("hwio", "oi")

    def __init__(self, *args, kernel_layout: str = "hwio", **kwargs):
        super().__init__(*args, **kwargs)
        if kernel_layout not in self.LAYOUTS:
            raise ValueError(f"kernel_layout must be one of {self.LAYOUTS}, not {kernel_layout!r}")
        self.kernel_layout = kernel_layout

    def get_config(self):
        # Conv2D's config exactly unless serving: checkpoints stay readable as plain Conv2D configs.
        config = super().get_config()
        return config if self.kernel_layout == "hwio" else {**config, "kernel_layout": self.kernel_layout}

    def add_weight(self, *args, shape=None, name=None, **kwargs):
        if name == "kernel" and self.kernel_layout == "oi":  # Conv2D.build asks for (kh, kw, in, out)
            shape = (shape[-1], int(np.prod(shape[:-1])))
        return super().add_weight(*args, shape=shape, name=name, **kwargs)

    def save_own_variables(self, store):
        if not (self.built and self.kernel_layout == "oi"):
            return super().save_own_variables(store)
        store["0"] = keras.ops.convert_to_numpy(self._hwio(self._kernel))
        if self.use_bias:
            store["1"] = self.bias

    def load_own_variables(self, store):
        if self.kernel_layout == "oi" and self.built:
            values = {key: store[key] for key in store.keys()}
            # Cast first, then transpose in the backend (threaded): 100M weights for conv6.
            kernel = keras.ops.cast(keras.ops.convert_to_tensor(values["0"]), self._kernel.dtype)
            values["0"] = keras.ops.transpose(keras.ops.reshape(kernel, (-1, self.filters)))
            return super().load_own_variables(values)
        return super().load_own_variables(store)

    def _hwio(self, oi_kernel):
        """An (out, kh*kw*in) kernel in Conv2D's (kh, kw, in, out) layout."""
        kh, kw = self.kernel_size
        return keras.ops.reshape(keras.ops.transpose(oi_kernel), (kh, kw, -1, self.filters))

    def _windows(self, x):
        """(B, oh, ow, kh*kw*C): every kh x kw window of x, flattened in kernel.reshape(-1, out)'s order.

        One gather of precomputed pixel indices rather than kh*kw slices and a concat: the same values,
        but its gradient is one segment sum instead of kh*kw zero-padded slice gradients added up
        (conv6 at 224x224, batch 8: 7 ms forward + backward instead of 47).
        """
        kh, kw = self.kernel_size
        if self.padding == "same":  # TensorFlow's SAME: the odd pixel of an even kernel goes after
            x = keras.ops.pad(x, [[0, 0], [(kh - 1) // 2, kh // 2], [(kw - 1) // 2, kw // 2], [0, 0]])
        batch, height, width = keras.ops.shape(x)[:3]
        channels = x.shape[-1]
        oh, ow = height - kh + 1, width - kw + 1
        rows = keras.ops.reshape(keras.ops.arange(oh), (-1, 1, 1, 1)) + keras.ops.reshape(keras.ops.arange(kh), (1, 1, -1, 1))
        cols = keras.ops.reshape(keras.ops.arange(ow), (1, -1, 1, 1)) + keras.ops.reshape(keras.ops.arange(kw), (1, 1, 1, -1))
        pixels = keras.ops.reshape(rows * width + cols, (-1,))  # (oh, ow, kh, kw) in row-major order
        windows = keras.ops.take(keras.ops.reshape(x, (batch, height * width, channels)), pixels, axis=1)
        return keras.ops.reshape(windows, (batch, oh, ow, kh * kw * channels))

    def convolution_op(self, inputs, kernel):
        if (tuple(self.strides) != (1, 1) or tuple(self.dilation_rate) != (1, 1) or self.groups != 1
                or self.data_format != "channels_last"):
            return super().convolution_op(inputs, self._hwio(kernel) if self.kernel_layout == "oi" else kernel)
        kh, kw = self.kernel_size
        if (kh, kw) != (1, 1):  # a 1x1 kernel's windows are the pixels themselves (and SAME pads nothing)
            # Unfold in float32: the input gradient sums up to kh*kw window entries per pixel, which
            # in bf16 would round after every add (Conv2D accumulates once); the cast back is cheap.
            inputs = keras.ops.cast(self._windows(keras.ops.cast(inputs, "float32")), inputs.dtype)
        if self.kernel_layout == "oi":
            # A transpose the graph optimizer folds into the product (TensorFlow's MatMul transpose_b).
            flat_kernel = keras.ops.transpose(kernel)
        else:
            flat_kernel = keras.ops.reshape(kernel, (kh * kw * kernel.shape[2], kernel.shape[3]))
        return keras.ops.tensordot(inputs, flat_kernel, axes=1)


