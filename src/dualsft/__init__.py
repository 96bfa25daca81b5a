"""dualsft: choose which parameters to update and which examples to train on from one set of gradient
statistics (the DualSFT method), then run that restricted fine-tuning."""

__version__ = "0.1.0"
