"""Config files: validation, conversion and resolution of registered functions."""
