"""carryover: embed."""
