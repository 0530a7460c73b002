"""Callbacks shared by the tasks (EMA, RNG-state capture, sample/embedding logging)."""
