"""Staged text-to-image personalization: methods as data, one training loop."""

__version__ = "0.1.0"
