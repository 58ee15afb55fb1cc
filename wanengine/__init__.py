"""wanengine: a layered inference engine for Wan2.2-I2V-A14B image-to-video."""
__version__ = "0.1.0"
