"""Model parts, one file each: vision tower, adapter, attention, decoder, the whole model."""
