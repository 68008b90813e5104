"""The embedded offline demo: an invented knowledge world and a tiny model that knows it."""
