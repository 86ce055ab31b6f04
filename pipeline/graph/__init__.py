"""carryover: graph."""
