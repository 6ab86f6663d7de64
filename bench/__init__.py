"""kvbus benchmarks: scripts that print figures against the project's targets. Run from the repo root:
`python -m bench` (all of them) or `python -m bench.<name>` (one), each with `--quick` and `--json PATH`."""
