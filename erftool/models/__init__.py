"""Model zoo: `create_model(name, **config)` and `list_models()`.

- linear-stack: n convs without nonlinearity (the ERF theory's networks).
- resnet-tiny[-rigid|-dc|-dk-local|-dk-global|-dk+dc]: small ResNets for the
  64x64 synthetic deformation dataset, identical but for the deformable stages.
- resnet18/34/50: torchvision-compatible state_dict keys; `op=`/`stages=`
  convert chosen stages' 3x3 convs to deformable layers.
"""
from functools import partial

from ..data.synthetic import SYNTHETIC_MEAN, SYNTHETIC_STD
from ._registry import (
    OPS, convert_stages, create_model, list_models, model_entry, normalise_op, register_model,
)
from .linear_stack import LinearStack, linear_stack
from .resnet import ResNet, resnet
from .resnet_tiny import ResNetTiny, resnet_tiny

__all__ = ["create_model", "list_models", "register_model", "convert_stages", "model_entry",
           "normalise_op", "OPS", "LinearStack", "ResNet", "ResNetTiny"]

_IMAGENET = {"input_size": (224, 224), "mean": (0.485, 0.456, 0.406),
             "std": (0.229, 0.224, 0.225)}
_SYNTHETIC = {"input_size": (64, 64), "mean": SYNTHETIC_MEAN, "std": SYNTHETIC_STD}
_OP_WORDS = {"rigid": "rigid 3x3 convs", "dc": "deformable convs (DCNv1)",
             "dk-local": "local Deformable Kernels (scope 5)",
             "dk-global": "global Deformable Kernels (scope 5)",
             "dk+dc": "DK + DC (kernel and data offsets, scope 5)"}

register_model("linear-stack", linear_stack,
               "n convs, no nonlinearity (op, kernel_size, scope, dilation): ERF theory")
register_model("resnet-tiny", resnet_tiny,
               "small ResNet for 64x64 synthetic data; op= picks the operator",
               _SYNTHETIC)
for _op in OPS:
    register_model(f"resnet-tiny-{_op}", resnet_tiny,
                   f"small ResNet for 64x64 synthetic data, {_OP_WORDS[_op]} in layer2-3",
                   _SYNTHETIC, op=_op)
for _depth in (18, 34, 50):
    register_model(f"resnet{_depth}", partial(resnet, _depth),
                   f"ResNet-{_depth}, torchvision keys; op=/stages= make stages deformable",
                   _IMAGENET)
