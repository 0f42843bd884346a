"""Data: sources (the demo generator), transforms and the Grain pipeline."""
