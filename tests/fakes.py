"""Test fakes, one per verl boundary. Each class says which boundary it replaces."""
