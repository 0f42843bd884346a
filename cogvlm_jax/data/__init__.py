"""Data: sources, the demo data, the example builder and the Grain pipeline."""
