"""Tracking: run directories, metrics files, checkpoints, progress and plots."""
