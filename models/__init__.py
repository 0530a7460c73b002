"""Models of the zoo: shared blocks in `models.blocks`, one file per task."""
