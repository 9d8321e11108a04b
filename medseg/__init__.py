"""medseg: valid-convolution U-Net segmentation for medical scans.

Nothing heavy is imported here so that ``medseg inspect`` and friends start fast.
"""

__version__ = "0.1.0"
