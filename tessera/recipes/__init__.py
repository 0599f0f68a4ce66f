"""Recipes: one command from data to a measured model (`tessera recipe NAME`), each a module here
with its config and README in configs/recipes/NAME/."""
