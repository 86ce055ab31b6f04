"""carryover: evaluate."""
