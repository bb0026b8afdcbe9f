"""tritongpt.data."""
