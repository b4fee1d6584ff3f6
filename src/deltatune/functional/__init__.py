"""Pure tensor math shared by methods (no modules, no state)."""
