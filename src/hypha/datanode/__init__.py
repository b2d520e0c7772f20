"""Data node role."""
