"""medistill: cross-modal knowledge distillation for medical images."""

__version__ = "0.1.0"
