"""The stage engine: stages with declared inputs, completion records, resume, --until."""
