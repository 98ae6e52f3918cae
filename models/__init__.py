"""Model definitions: each a plain Pyro function following the project's model convention
(docs/model_convention.md). Installed as the importable package ``pyro_nlme_models``; copy one
of these files to write your own model."""
