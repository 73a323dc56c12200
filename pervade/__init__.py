"""pervade: high-throughput LLM inference on opportunistic GPUs with pervasive context management."""

__version__ = "0.1.0"
