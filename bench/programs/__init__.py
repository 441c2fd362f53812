"""Programs built on the library, outside its import graph: nothing in leakbench imports them
(pyproject.toml's import contracts).

- ``python -m leakbench.programs.label_study``: every label strategy against batch size and
  label distribution, on untrained and trained victims (``make leaderboards`` runs it).
- ``python -m leakbench.programs.flower_example``: a real Flower server and two clients on
  loopback, recorded and audited end to end (needs ``pip install leakbench[flower]``).
"""
