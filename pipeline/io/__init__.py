"""carryover: io."""
