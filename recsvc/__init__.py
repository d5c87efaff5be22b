"""recsvc: real-time recommendation serving (aiohttp + Redis + LightGBM)."""

__version__ = "0.1.0"
