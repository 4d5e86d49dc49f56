"""PRIVACY-CRITICAL: a site's differential-privacy mechanism, in one package.

Everything a hospital's ε rests on lives here and nowhere else; a change to any of these modules is a change
to the privacy guarantee and is reviewed as one.

- :mod:`client.dp.rng`: where the mechanism's randomness comes from (the operating system's entropy; a
  reproducible research mode that only the simulation can select).
- :mod:`client.dp.sgd`: DP-SGD for one round: Poisson sampling at the run's fixed rate, per-record clipping,
  one Gaussian noise draw per step (empty batches included), Opacus's accountant.
- :mod:`client.dp.distributed`: the same round over N worker processes of the site (the hospital's
  setting): one Poisson batch (of records or of patients) drawn once, clipped per worker, summed, noised
  exactly once by rank 0; :mod:`client.dp.distributed_patients` its patient-level optimizer and
  :mod:`client.dp.worker_job` the worker processes themselves (spawn, run, check they stepped alike).
- :mod:`client.dp.patients`: the patient as the unit: per-patient gradients, clipped per patient.
- :mod:`client.dp.clipping`: per-record clipping in one backward pass.
- :mod:`client.dp.release`: the other values a site releases under DP (its record count, its validation
  statistics), each a Gaussian mechanism composed with training in the same accountant.
- :mod:`client.dp.accounting`: ε of a history, noise calibration, the run's privacy plan (pure functions
  over Opacus's accountants).
- :mod:`client.dp.ledger`: the durable, locked record of every release, keyed by the data source the
  hospital configured, never by a name the coordinator sends.
"""
