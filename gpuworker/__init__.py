"""The GPU worker: loads a context once, keeps it resident, scores the batches it pulls."""
