"""Loading and saving: checkpoint files, weight sources, model sources."""
