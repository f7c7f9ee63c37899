"""Building crop sets for training and evaluation from labelled track images."""
