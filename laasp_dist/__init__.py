"""laasp-dist: loss-aware automatic selection of structured pruning criteria, on Ray."""

__version__ = "0.1.0"
