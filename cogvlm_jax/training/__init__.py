"""Training: train state (recipes, optimizer, shardings), loss + compiled step, the loop."""
