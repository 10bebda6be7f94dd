"""Forward FLOPs of a model, counted from its layers: what the benchmarks divide by."""

from __future__ import annotations

import keras
from keras import layers

def count_flops(model: keras.Model, height: int, width: int) -> int:
    """Forward FLOPs (2 x multiply-adds) for one height x width image, counted analytically from the layers.

    Convolutions and transposed convolutions only: pooling, ReLU and adds are under 0.1%.
    """
    convs = [layer for layer in model.layers if isinstance(layer, (layers.Conv2D, layers.Conv2DTranspose))]
    probe = keras.Model(model.inputs, [(layer.input, layer.output) for layer in convs])
    shapes = probe.compute_output_spec(keras.KerasTensor((1, height, width, 3)))
    flops = 0
    for layer, (inp, out) in zip(convs, shapes):
        kh, kw = layer.kernel_size
        in_c, out_c = inp.shape[-1], out.shape[-1]
        # A transposed conv does its multiply-adds per input pixel; a conv per output pixel.
        pixels = inp.shape[1] * inp.shape[2] if isinstance(layer, layers.Conv2DTranspose) else out.shape[1] * out.shape[2]
        flops += 2 * pixels * kh * kw * in_c * out_c
    return int(flops)
