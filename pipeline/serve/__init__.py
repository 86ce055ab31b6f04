"""`carryover serve`: the serving version's model and faiss index held in memory behind HTTP."""
