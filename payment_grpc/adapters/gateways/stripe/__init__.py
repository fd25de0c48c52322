"""The Stripe adapter (official SDK): client, transformers, errors, webhook."""
