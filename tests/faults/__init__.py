"""Fault injection: crashes, misbehaving receivers and brokers, a full disk, signals under load."""
