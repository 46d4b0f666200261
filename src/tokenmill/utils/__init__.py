"""Small helpers shared by every layer: dtypes, devices, logging."""
