"""Small shared utilities: atomic file writes, logging set-up."""
