"""Calibration routines (an application layer above `vtprune.apply`): they run models, read the testbed's
calibration split and write the per-model tables that the methods only read (e.g. DCP-Prune's τ_κ,
`vtprune.calibration.dcp`)."""
