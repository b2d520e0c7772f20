"""Scheduler role."""
