"""carryover: gallery."""
