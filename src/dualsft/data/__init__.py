"""Data: reading pools and target sets, formatting with templates, collating batches, building real task data."""
