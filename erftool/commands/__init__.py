"""The work behind each `erftool` command, one module per command.

`cli.py` parses options and maps failures to exit codes; these modules do the
work and are testable without click:
    common   console, staged (atomic) output, user-facing error messages
    models   model/checkpoint/input resolution shared by the commands
    data     synthetic probe batches
    compare, heatmap, verify, train, figures (with paper: the README figures)
"""
