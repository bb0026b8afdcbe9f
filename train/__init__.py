"""tritongpt.train."""
