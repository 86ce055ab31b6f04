"""carryover: models."""
