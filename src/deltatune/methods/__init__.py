"""One file per method. Importing this package registers every built-in method."""
