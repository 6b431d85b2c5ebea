"""itr: an experiment orchestrator for image–text retrieval research (BCLS, Listwise ITR, CUSA losses)."""

__version__ = "0.1.0"
