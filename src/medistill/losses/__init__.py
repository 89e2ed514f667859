"""Losses: named terms a method weights and the trainer sums."""
