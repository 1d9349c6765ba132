"""The training objective: the corruption operators (A, the further corruption B, Theorem 4.1's
condition), the random streams every draw of a run comes from, and what a training step computes
from a stored batch (the ambient input and the loss)."""
