"""Elastic membership: who is in the run, and how the run goes on when sites fail, leave and come back.

* ``wire.py``: the authenticated connection (challenge-response on the run's secret, MACed frames).
* ``coordinator.py``: the coordinator process: membership, generations, quorums, votes, sums, the store.
* ``client.py``: a worker's side: join, heartbeat, and the blocking requests, retried through outages.
* ``store.py``: gloo's rendezvous store over the coordinator.
* ``fingerprint.py``: what a joining site must share with the run.
* ``deadlines.py``: the hierarchy of deadlines, and a transfer's deadline from its size and the links.
* ``heal.py``: the state a healer sends, how long it takes, and whether the members wait for it.

The coordinator is the control plane; gloo between sites is the data plane. Nothing but ``store.py`` imports
torch, so ``geotrain coordinator`` starts fast and stays small.
"""
