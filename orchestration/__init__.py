"""hqlt package."""
