"""tern's tests: a package, so that no dependency shipping its own `tests` shadows it."""
