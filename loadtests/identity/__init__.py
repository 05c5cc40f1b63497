"""The identity model's generated people, its quality benchmark and its training (docs/identity.md)."""
