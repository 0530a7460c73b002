"""Losses shared by the tasks: token labeling (DeMansia 2), metric learning (face), multi-task weighting."""
