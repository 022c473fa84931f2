"""erftool: effective receptive fields of rigid, deformable-convolution and
deformable-kernel networks, with the operators to build them."""

__version__ = "0.1.0"
