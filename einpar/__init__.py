"""einpar: a compiled einsum parallelism DSL and simulator.

`import einpar` is cheap: it imports neither JAX nor any backend. The stages
are reachable from here (see einpar.api) and from the `einpar` command.
"""

__version__ = "0.1.0"
