"""`FeatureTap`: how a backbone declares the feature maps a decoder may read.

A backbone passes each multi-scale feature map through a `FeatureTap(name="C3", stride=8)`.
The tap is the identity (no weights, no computation, the input's dtype passes through, so
mixed precision and exported graphs are unchanged: TensorFlow and tf2onnx drop identities), but
it sits in the functional graph under the feature's name with the feature's stride in its config.
`dlmodels.models.backbone_features` / `feature_model` / `feature_strides` find the taps of any
backbone without knowing its layer names, the feature-pyramid contract of Lin et al. 2017
("Feature Pyramid Networks for Object Detection": C_i has stride 2**i) that timm's
`features_only` and keras-hub's `pyramid_outputs` also follow.
"""

from __future__ import annotations

import keras

from dlmodels._validation import check_positive_int


@keras.saving.register_keras_serializable(package="dlmodels")
class FeatureTap(keras.layers.Layer):
    """Identity layer marking a named backbone feature map and its stride.

    Decoders (U-Net encoders, DeepLab, FPN) read a backbone's features through the taps it
    declares instead of parsing layer names, so any backbone that taps its stages plugs into any
    decoder. The layer's name is the feature's name ("C1" ... "C5" by convention: C_i has stride
    2**i unless dilation lowers it).

    Args:
        stride: the feature map's stride relative to the model input (>= 1), e.g. 8 for C3 of a
            ResNet, 8 for C5 of a ResNet with output_stride=8.
        name: the feature's name, e.g. "C3" (required: it is the key decoders look up).

    Returns:
        The input tensor unchanged (same shape and dtype).
    """

    def __init__(self, stride, name=None, **kwargs):
        if not name:
            raise ValueError(
                "FeatureTap: `name` must be the feature's name (e.g. name='C3'), got "
                f"{name!r}; decoders look features up by it."
            )
        super().__init__(name=name, **kwargs)
        self.stride = check_positive_int("stride", stride, owner=f"FeatureTap {name!r}")
        # Pass the input's dtype through (no cast to the compute dtype): a tap on a float32
        # tensor in a mixed_float16 model stays float32, a float16 one stays float16.
        self.autocast = False
        self.supports_masking = True
        self._build_at_init()

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype, sparse=inputs.sparse)

    def get_config(self):
        config = super().get_config()
        config["stride"] = self.stride
        return config
