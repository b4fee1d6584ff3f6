"""deltatune: parameter-efficient fine-tuning and model merging for any PyTorch model."""
__version__ = "0.1.0"
