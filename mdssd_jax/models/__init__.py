"""SSD / MDSSD detectors in Flax Linen (VGG16 trunk, extra layers, Fusion Blocks, heads)."""

from mdssd_jax.models.build import build_detector, build_model, feature_sizes
from mdssd_jax.models.fusion import FusionBlock, deconv_kernels
from mdssd_jax.models.kernels import KERNEL_CHOICES
from mdssd_jax.models.registry import get_builder, known_architectures, register
from mdssd_jax.models.ssd import SSD, abstract_forward, count_params
from mdssd_jax.models.vgg import L2Norm, VGG16Trunk, scaled_width

__all__ = ["KERNEL_CHOICES", "SSD", "FusionBlock", "L2Norm", "VGG16Trunk", "abstract_forward",
           "build_detector", "build_model", "count_params", "deconv_kernels", "feature_sizes",
           "get_builder", "known_architectures", "register", "scaled_width"]
