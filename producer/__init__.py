"""Streams claims x templates into the broker: ``pervade produce``, and a Python API for scripts."""

from pervade.producer.claims import ClaimFields, ClaimsSource, read_claims
from pervade.producer.client import Producer, SubmitReport
from pervade.producer.run import ProduceOutcome, ProduceRequest, produce
from pervade.producer.templates import load_templates, validate_templates

__all__ = [
    "ClaimFields",
    "ClaimsSource",
    "ProduceOutcome",
    "ProduceRequest",
    "Producer",
    "SubmitReport",
    "load_templates",
    "produce",
    "read_claims",
    "validate_templates",
]
