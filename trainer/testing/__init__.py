"""Fault injection for tests (SLIMTRAIN_FAULT): kept apart from the production modules."""
