"""carryover: compat."""
