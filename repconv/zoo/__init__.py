"""Built-in reference architectures."""
