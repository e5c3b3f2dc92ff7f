"""Interaction logs to train on: synthetic logs with an oracle, and the UCI Census-Income data."""
