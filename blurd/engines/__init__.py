"""Engines: the BlurIt cloud API and the built-in local engine, behind one interface."""
