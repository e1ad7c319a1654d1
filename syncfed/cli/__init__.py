"""Command-line entry points: thin layers from flags to a config to ``asyncio.run``."""
