"""Pure tensor functions of the delta algebra: tensors in, tensors out; no files, no modules, no registry."""
