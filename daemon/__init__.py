"""Wingbeat's shells: files, command line, and (later) sockets and processes around the pure core in model/."""
