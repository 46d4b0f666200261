"""The `tokenmill` command line."""
