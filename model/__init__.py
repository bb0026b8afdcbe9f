"""tritongpt.model."""
