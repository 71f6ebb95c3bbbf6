"""Thin shells over tb_microscope.Logger for training frameworks."""
