"""Sinks: collect verdicts from the broker into Parquet."""
