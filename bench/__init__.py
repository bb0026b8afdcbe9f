"""tritongpt.bench."""
