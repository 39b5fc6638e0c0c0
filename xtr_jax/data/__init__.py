"""Input data: BEIR and training-pair readers, hard-negative mining, seqio tasks, resumable per-host input."""
