"""A/B experiments: assignment, exposure logging, the report and its statistics."""
