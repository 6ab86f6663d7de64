"""The kvbus agent: holds KV chunks inside an engine process and carries out the controller's commands."""
