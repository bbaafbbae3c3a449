"""Synthetic long-context tasks (SymbolSoup, MQAR, passkey) written as masked task shards."""
