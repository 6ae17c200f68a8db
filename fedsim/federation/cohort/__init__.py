"""The vectorised cohort engine: a round's clients trained as one batched computation."""
