"""lorafactory: benchmark LoRA variants behind one interface, with fair learning-rate sweeps."""

__version__ = "0.1.0"
