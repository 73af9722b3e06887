"""``python -m recipes.claims`` (see :mod:`recipes.claims.cli`)."""

from recipes.claims.cli import main

if __name__ == "__main__":
    main()
