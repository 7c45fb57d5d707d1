"""Support for tests and benchmarks; the product never imports it (a test checks).

- `tiny_models`: randomly initialised diffusion models in the real classes (tiny or full-size),
  saved as diffusers-layout folders, and sgm-style single-file checkpoints;
- `synthetic`: scenes with a known answer: splats on a mesh, a rendered ball of splats, a views zip;
- `fake_http`: the base of the fake HTTP backends the add-on tests talk to.

Fixtures that only pytest needs (one thread per test module, slow/GPU markers) live in
`tests/conftest.py`; stand-in job runners for the service in `tests/service_runners.py`.
"""
