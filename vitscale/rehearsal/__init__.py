"""A multi-node cluster on one machine, for rehearsing jobs (``vitscale-rehearse``).

Each node is a network namespace with its own host name (a UTS namespace per process tree
entered through ``enter.py``), its own interface named as on the cluster (``ib0``) with an
address from 198.18.0.0/15 (reserved for network benchmarks), joined by veth pairs on a
bridge in a switch namespace of its own; nothing is added to the machine's own network.
``cluster.py`` builds and removes it, ``launchers.py`` says how each launcher starts a job on
it, ``faults.py`` slows, cuts, freezes or kills a node.
"""
