"""Serves nothing: holds the built Microscope tab (index.js) as package data."""
