"""Contracts both sides share: settings, errors, wire schemas, names, state store, storage, media."""
