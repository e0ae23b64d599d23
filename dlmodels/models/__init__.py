"""Paper models and the registry: `dlmodels.models.get(name, **kw)`, `dlmodels.models.list()`.

Conventions every builder follows:

- Output: models return **logits** unless asked otherwise (`classifier_activation=` of the
  ResNets, `final_activation=` of the segmenters; both default to None). Pair them with
  `from_logits=True` losses; `output_kind(model)` says what a model returns ("logits",
  "softmax", "sigmoid" or "unknown"), for training code and export manifests. The output layer
  computes in float32, also under a mixed precision policy.
- Features: a backbone declares its multi-scale feature maps with
  `dlmodels.layers.FeatureTap` layers ("C1" ... "C5", C_i of stride 2**i unless dilated);
  decoders read them with `backbone_features(model)`, `feature_model(model, names)` and
  `feature_strides(model)`, never by parsing layer names.
"""

from dlmodels.models.backbone import backbone_features, feature_model, feature_strides
from dlmodels.models.deeplab import DeepLabV3, DeepLabV3Plus
from dlmodels.models.fcn import FCN
from dlmodels.models.gan import ConditionalGAN
from dlmodels.models.outputs import output_kind
from dlmodels.models.pspnet import PSPNet
from dlmodels.models.registry import entry, get, list, register
from dlmodels.models.resnet import (
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet50V2,
    ResNet101,
    ResNet101V2,
    ResNet152,
    ResNet152V2,
    resnet_features,
)
from dlmodels.models.sequence import (
    Seq2SeqForecaster,
    SequenceClassifier,
    SequenceForecaster,
    seq2seq_inference_model,
    teacher_forcing_inputs,
)
from dlmodels.models.unet import (
    AttentionUNet,
    ResUNet,
    UNet,
    predict_tiled,
    unet_valid_input_size,
    unet_valid_output_size,
)
from dlmodels.models.unet3plus import ClassGuidedGate, UNet3Plus
from dlmodels.models.unet_plus_plus import UNetPlusPlus
from dlmodels.models.unet_plus_plus import prune as prune_unet_plus_plus
from dlmodels.models.vae import VAE

__all__ = [
    "FCN",
    "VAE",
    "AttentionUNet",
    "ClassGuidedGate",
    "ConditionalGAN",
    "DeepLabV3",
    "DeepLabV3Plus",
    "PSPNet",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet50V2",
    "ResNet101",
    "ResNet101V2",
    "ResNet152",
    "ResNet152V2",
    "ResUNet",
    "Seq2SeqForecaster",
    "SequenceClassifier",
    "SequenceForecaster",
    "UNet",
    "UNet3Plus",
    "UNetPlusPlus",
    "backbone_features",
    "entry",
    "feature_model",
    "feature_strides",
    "get",
    "list",
    "output_kind",
    "predict_tiled",
    "prune_unet_plus_plus",
    "register",
    "resnet_features",
    "seq2seq_inference_model",
    "teacher_forcing_inputs",
    "unet_valid_input_size",
    "unet_valid_output_size",
]
