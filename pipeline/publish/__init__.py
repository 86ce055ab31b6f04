"""Copies of gallery versions in vector databases, and the serving name promote/rollback move."""
