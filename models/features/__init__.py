"""Features: image backbones, the bag-of-words vectoriser, and dataset root -> features."""
