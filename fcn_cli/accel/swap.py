"""fcn's kernels in and out of a model, by layer name: checkpoints hold stock layers.

best.keras is what users take home, so it is written with every layer as the stock ``Conv2D`` it
computes (:func:`portable_config`, :func:`stock_model`): plain Keras reads it without fcn installed.
Loading puts fcn's kernels back where they pay (:func:`accelerated_config`, :func:`with_layers_of`).
Same weights and outputs either way; the saved-file layout of each layer is Conv2D's.
"""

from __future__ import annotations

import keras

from fcn_cli.accel import enabled

# registered name -> class name; which layers of an FCN take which kernel
_FAST_LAYERS = {"fcn>MatmulConv2D": "MatmulConv2D", "fcn>SmallMapConv2D": "SmallMapConv2D"}


def _fast_layer_for(name: str) -> str | None:
    if name in ("conv6", "conv7"):
        return "fcn>MatmulConv2D"
    if name.startswith("block") and "_conv" in name:
        return "fcn>SmallMapConv2D"
    return None


def portable_config(config):
    """A model config with fcn's kernels written as the stock ``Conv2D`` they compute (same weights, same
    outputs): a checkpoint that ``keras.saving.load_model`` reads without fcn_cli installed."""
    if isinstance(config, list):
        return [portable_config(v) for v in config]
    if not isinstance(config, dict):
        return config
    config = {k: portable_config(v) for k, v in config.items()}
    if config.get("registered_name") in _FAST_LAYERS:
        inner = {k: v for k, v in config["config"].items() if k != "kernel_layout"}
        config.update(module="keras.layers", class_name="Conv2D", registered_name=None, config=inner)
    return config


def accelerated_config(config, accel: bool | None = None):
    """The inverse of :func:`portable_config` where fcn's kernels are on (``accel``, default
    :func:`fcn_cli.accel.enabled`); where they are off, fcn's kernels (older checkpoints) become stock layers."""
    if accel is None:
        accel = enabled()
    if not accel:
        return portable_config(config)
    if isinstance(config, list):
        return [accelerated_config(v, accel) for v in config]
    if not isinstance(config, dict):
        return config
    config = {k: accelerated_config(v, accel) for k, v in config.items()}
    inner = config.get("config")
    if config.get("class_name") == "Conv2D" and config.get("module") == "keras.layers" and isinstance(inner, dict):
        fast = _fast_layer_for(str(inner.get("name", "")))
        if fast:
            module = "fcn_cli.accel.matmul_conv" if fast == "fcn>MatmulConv2D" else "fcn_cli.accel.small_map_conv"
            config.update(module=module, class_name=_FAST_LAYERS[fast], registered_name=fast)
    return config


def stock_model(model: keras.Model) -> keras.Model:
    """``model`` itself if it has only stock layers, else a copy built from :func:`portable_config`
    holding the same weights (a saved file keys weights by layer class)."""
    if not any(keras.saving.get_registered_name(type(layer)) in _FAST_LAYERS for layer in model.layers):
        return model
    return with_layers_of(model, keras.Model.from_config(portable_config(model.get_config())))


def with_layers_of(source: keras.Model, target: keras.Model) -> keras.Model:
    """``target`` (the same network, other layer classes or weight layouts) holding ``source``'s weights.

    Each layer hands its weights over in the saved-file layout (``save_own_variables`` /
    ``load_own_variables``), which every variant of a layer shares."""
    for src, dst in zip(source.layers, target.layers):
        if src.weights:
            store = {}
            src.save_own_variables(store)
            dst.load_own_variables(store)
    return target
