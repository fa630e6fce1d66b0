"""Running a configured experiment: the only layer that knows every other one (DESIGN §2).

- `methods`: the methods by name, their settings from the config, `run_method`;
- `runner`: `run_experiment` (vanilla -> methods -> evaluation -> diagnostics -> report);
- `method_pool`, `concurrent`: the methods on a few worker processes at once, merged into the same report;
- `diagnostics`: each method's diagnostics and attacks, cached in the report;
- `sweep`: choosing settings on validation pseudo-forget people;
- `artifacts`: a method run's outputs on disk;
- `plan`: compile-only memory and FLOP plans for the 7B configs.
"""
