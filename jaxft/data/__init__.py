"""Data: sources (folder, TFDS, offline built-ins), transforms and the grain pipeline."""
