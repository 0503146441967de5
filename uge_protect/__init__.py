"""uge-protect: protect image-text WebDataset shards against unauthorized training."""

__version__ = "0.1.0"
