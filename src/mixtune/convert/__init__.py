"""`mixtune convert --from NAME`: build a loadable checkpoint folder from a model's released pieces."""
