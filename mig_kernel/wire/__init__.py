"""What travels between processes: signed message envelopes, errors, connection files."""
