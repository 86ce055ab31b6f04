"""carryover: plan."""
