"""carryover: data."""
