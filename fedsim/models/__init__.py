"""Model factories: classical (and quantum, when PennyLane is installed)."""
