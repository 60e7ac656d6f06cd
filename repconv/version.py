"""repconv's version, in a module of its own so that whatever records it imports nothing else."""

__version__ = "0.1.0"
