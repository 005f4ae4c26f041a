"""Performance harnesses whose numbers the README quotes."""
