"""The merge YAML: `parse` reads it into a typed MergeConfig; `resolve` gives each tensor its parameters."""
