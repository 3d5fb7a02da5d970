"""The recipe: its schema (pydantic), loading with `extends:` and overrides, the generated reference."""
