"""The kvbus controller: LMCache's controller HTTP API over a Redis stream bus and index. Stateless."""
