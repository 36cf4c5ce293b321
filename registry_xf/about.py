"""Version numbers."""

__version__ = "0.1.0"
# Version of the directory layout written by registry_xf.save (config.cfg, model.safetensors,
# meta.json). Bumped when a saved directory could not be read the same way any more.
FORMAT_VERSION = 1
