"""repconv: fold structurally re-parameterized CNN blocks into plain convolutions, verified."""

__version__ = "0.1.0"
