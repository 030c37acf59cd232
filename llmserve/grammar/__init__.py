"""Structured outputs: a request's StructuredOutputs compiled by llguidance into a token matcher."""
