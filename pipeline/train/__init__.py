"""carryover: train."""
