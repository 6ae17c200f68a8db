"""fedsim: simulate privacy attacks and defenses in federated learning."""

__version__ = "0.1.0"
