"""atoll.trainer: recipe schema, model, data, optimizer, train loop and metrics."""
