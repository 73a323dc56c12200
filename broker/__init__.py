"""The broker: queues claim batches per context and hands them to workers by affinity."""
