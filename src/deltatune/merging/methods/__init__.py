"""Merge methods, one file each; importing a file registers its methods (see `deltatune.merging.registry`)."""
