"""Prepare the hotdog dataset as WebDataset shards (see docs/data.md and docs/manifest.md)."""

__version__ = "0.1"
