"""fcn: fully convolutional networks (FCN-32s/16s/8s, VGG-16) for semantic segmentation."""

__version__ = "0.1.0"
