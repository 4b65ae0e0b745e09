"""SFDA-PFT core: the method (models, losses, stages, adaptation), data pipeline and bundle.

``pft.core`` knows nothing of Flower, the CLI, ``client``, ``server`` or ``simulations``.
"""

__version__ = "0.1.0"
