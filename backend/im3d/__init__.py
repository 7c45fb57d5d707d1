"""IM-3D backend: text or image -> orbit video -> Gaussian splats -> textured mesh."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
